"""Run one parsed batch line through the model and build its output line.

Every failure of one line (a prompt over the context, an engine error, an endpoint the
engine cannot serve) becomes that line's error output; only cancellation propagates, so one
bad line never stops the batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dynamo_run.errors import RequestError
from dynamo_run.inputs.batch.lines import (
    FORM_OPENAI,
    URL_CHAT,
    URL_COMPLETION,
    BatchItem,
    LineError,
)
from dynamo_run.inputs.batch.records import error_record, openai_record, text_record
from dynamo_run.pipeline.choices import complete_choices, expand_choices
from dynamo_run.pipeline.client import EngineFailure, ModelClient
from dynamo_run.pipeline.preprocess import new_request_id
from dynamo_run.pipeline.responses import (
    TokenTexts,
    chat_completion_body,
    embedding_body,
    embedding_token_ids,
    text_completion_body,
    tool_call_dict,
)
from dynamo_run.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("dynamo_run.batch")


class BatchExecutor:
    """Turns parsed lines into output lines with one model client."""

    def __init__(self, client: ModelClient, engine_name: str) -> None:
        self.client = client
        self.engine_name = engine_name
        self.model = client.card.name
        self.token_texts = TokenTexts(client.card.tokenizer)

    async def run(self, item: BatchItem) -> dict[str, Any]:
        """The output line for ``item``; never raises except on cancellation."""
        try:
            if item.error is not None:
                raise item.error
            if item.form == FORM_OPENAI:
                return await self._openai(item)
            return await self._text(item)
        except LineError as exc:
            return error_record(item, exc)
        except RequestError as exc:
            return error_record(item, LineError(exc.code or "invalid_request", str(exc)))
        except EngineFailure as exc:
            return error_record(item, LineError("engine_error", str(exc)))
        except Exception as exc:  # an engine bug must not end the batch
            log.debug("line %d failed", item.line, exc_info=True)
            message = f"{type(exc).__name__}: {exc}"
            return error_record(item, LineError("internal_error", message))

    # --- text and chat lines ------------------------------------------------------------
    async def _text(self, item: BatchItem) -> dict[str, Any]:
        assert isinstance(item.request, ChatCompletionRequest)
        prepared = self.client.prepare_chat(item.request)
        done = await self.client.complete(prepared)
        record = text_record(
            item,
            done.text,
            done.prompt_tokens,
            done.completion_tokens,
            round(done.elapsed * 1000),
            done.finish_reason,
            worker_id=done.worker_id,
        )
        if done.reasoning is not None:
            record["reasoning"] = done.reasoning
        if done.tool_calls:
            record["tool_calls"] = [tool_call_dict(c) for c in done.tool_calls]
        return record

    # --- OpenAI batch lines -------------------------------------------------------------
    async def _openai(self, item: BatchItem) -> dict[str, Any]:
        req = item.request
        if item.url == URL_CHAT:
            assert isinstance(req, ChatCompletionRequest)
            body, request_id = await self._chat_body(req)
        elif item.url == URL_COMPLETION:
            assert isinstance(req, CompletionRequest)
            body, request_id = await self._completion_body(req)
        else:
            assert isinstance(req, EmbeddingRequest)
            body, request_id = await self._embedding_body(req)
        return openai_record(item, body, request_id)

    async def _chat_body(self, req: ChatCompletionRequest) -> tuple[dict[str, Any], str]:
        prepared = self.client.prepare_chat(req)
        done = await complete_choices(self.client, expand_choices([prepared], req.n))
        body = chat_completion_body(
            new_request_id("chatcmpl"),
            int(time.time()),
            self.model,
            prepared,
            done,
            self.token_texts if req.logprobs else None,
            req.top_logprobs or 0,
        )
        return body, prepared.engine_request.request_id

    async def _completion_body(self, req: CompletionRequest) -> tuple[dict[str, Any], str]:
        prompts = self.client.preprocessor.completion(req)
        done = await complete_choices(self.client, expand_choices(prompts, req.n))
        body = text_completion_body(
            new_request_id("cmpl"),
            int(time.time()),
            self.model,
            prompts,
            done,
            req.echo,
            self.token_texts if req.logprobs is not None else None,
            req.logprobs or 0,
        )
        return body, prompts[0].engine_request.request_id

    async def _embedding_body(self, req: EmbeddingRequest) -> tuple[dict[str, Any], str]:
        engine = self.client.engine
        if not engine.capabilities().embeddings:
            raise LineError("not_supported", f"out={self.engine_name} cannot compute embeddings")
        token_ids = embedding_token_ids(self.client, req)
        vectors = await engine.embed(token_ids)
        return embedding_body(self.model, req, token_ids, vectors), new_request_id()
