"""Run one parsed batch line through the model and build its output line.

Every failure of one line (a prompt over the context, an engine error, an endpoint the
engine cannot serve) becomes that line's error output; only cancellation propagates, so one
bad line never stops the batch.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from dynamo_run.inputs.batch_lines import (
    FORM_OPENAI,
    URL_CHAT,
    URL_COMPLETION,
    BatchItem,
    LineError,
)
from dynamo_run.inputs.batch_records import error_record, openai_record, text_record
from dynamo_run.inputs.http_render import TokenTexts
from dynamo_run.pipeline.client import Completion, EngineFailure, ModelClient, copy_for_choice
from dynamo_run.pipeline.preprocess import PreparedRequest, RequestError
from dynamo_run.protocol.openai import (
    AssistantMessage,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    PromptTokensDetails,
    Usage,
)

log = logging.getLogger("dynamo_run.batch")

T = TypeVar("T")


async def _all(aws: list[Awaitable[T]]) -> list[T]:
    """Await all; if one fails, cancel the others before raising (no orphan requests)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _usage(prompt: int, completion: int, cached: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


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
        prepared = self.client.preprocessor.chat(item.request)
        done = await self.client.complete(prepared)
        return text_record(
            item,
            done.text,
            done.prompt_tokens,
            done.completion_tokens,
            round(done.elapsed * 1000),
            done.finish_reason,
        )

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

    async def _run_choices(self, prepared: PreparedRequest, n: int) -> list[Completion]:
        choices = [copy_for_choice(prepared, i) for i in range(n)]
        return await _all([self.client.complete(p) for p in choices])

    async def _chat_body(self, req: ChatCompletionRequest) -> tuple[dict[str, Any], str]:
        prepared = self.client.preprocessor.chat(req)
        done = await self._run_choices(prepared, req.n)
        top = req.top_logprobs or 0
        choices = [
            ChatCompletionChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=ChatChoiceLogprobs.model_validate(
                    {"content": self.token_texts.chat_logprobs(c.logprobs, top)}
                )
                if req.logprobs
                else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(done)
        ]
        body = ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=self.model,
            choices=choices,
            usage=_usage(
                prepared.prompt_tokens,
                sum(c.completion_tokens for c in done),
                max(c.cached_tokens for c in done),
            ),
        )
        return body.model_dump(mode="json"), prepared.engine_request.request_id

    async def _completion_body(self, req: CompletionRequest) -> tuple[dict[str, Any], str]:
        prompts = self.client.preprocessor.completion(req)
        runs = await _all([self._run_choices(p, req.n) for p in prompts])
        choices = []
        for p_index, (prepared, done) in enumerate(zip(prompts, runs, strict=True)):
            for c_index, c in enumerate(done):
                prefix = prepared.prompt_text if req.echo else ""
                logprobs = None
                if req.logprobs is not None:
                    block, _ = self.token_texts.completion_logprobs(
                        c.logprobs, req.logprobs, len(prefix)
                    )
                    logprobs = CompletionLogprobs.model_validate(block)
                choices.append(
                    CompletionChoice(
                        index=p_index * req.n + c_index,
                        text=prefix + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                    )
                )
        body = CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=self.model,
            choices=choices,
            usage=_usage(
                sum(p.prompt_tokens for p in prompts),
                sum(c.completion_tokens for done in runs for c in done),
                max(c.cached_tokens for done in runs for c in done),
            ),
        )
        return body.model_dump(mode="json"), prompts[0].engine_request.request_id

    async def _embedding_body(self, req: EmbeddingRequest) -> tuple[dict[str, Any], str]:
        embed = getattr(self.client.engine, "embed", None)
        if embed is None:
            raise LineError("not_supported", f"out={self.engine_name} cannot compute embeddings")
        inputs = req.input
        if isinstance(inputs, str):
            batch: list[str | list[int]] = [inputs]
        elif inputs and all(isinstance(x, int) for x in inputs):
            batch = [list(inputs)]  # type: ignore[arg-type]
        else:
            batch = list(inputs)  # type: ignore[arg-type]
        if not batch:
            raise LineError("invalid_request", "body.input: is empty")
        pre = self.client.preprocessor
        ids = [pre.encode(x) if isinstance(x, str) else list(x) for x in batch]
        ctx = self.client.card.context_length
        for i, tokens in enumerate(ids):
            if not tokens:
                raise LineError("invalid_request", f"body.input[{i}]: is empty")
            if len(tokens) > ctx:
                raise LineError(
                    "context_length_exceeded",
                    f"body.input[{i}] has {len(tokens)} tokens; this model's maximum context "
                    f"length is {ctx} tokens",
                )
        vectors = await embed(ids)
        data = []
        for i, vec in enumerate(vectors):
            if req.dimensions is not None and req.dimensions != len(vec):
                raise LineError(
                    "invalid_request",
                    f"body.dimensions: this model's embeddings have {len(vec)} dimensions",
                )
            value: list[float] | str = [float(v) for v in vec]
            if req.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append(EmbeddingData(index=i, embedding=value))
        prompt_tokens = sum(len(t) for t in ids)
        body = EmbeddingResponse(
            data=data,
            model=self.model,
            usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
        return body.model_dump(mode="json"), f"req-{uuid.uuid4().hex[:24]}"
