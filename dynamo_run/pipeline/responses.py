"""Whole (non-streamed) OpenAI response bodies, built once for every input.

``in=http`` and ``in=batch`` both answer with ``chat.completion``, ``text_completion`` and
embeddings ``list`` bodies; they come from here so that the two cannot drift apart. Bodies
are plain dicts (about 10x cheaper than pydantic models on the HTTP path) in the shapes of
the models in :mod:`dynamo_run.protocol.openai`; the tests validate them against those
models. Logprob rendering lives here too: the SSE chunks of ``in=http`` use it per token.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from tokenizers import Tokenizer

from dynamo_run.errors import RequestError
from dynamo_run.parsers import ToolCall
from dynamo_run.pipeline.client import Completion, ModelClient
from dynamo_run.pipeline.preprocess import PreparedRequest
from dynamo_run.protocol.internal import TokenLogprob
from dynamo_run.protocol.openai import EmbeddingRequest


class TokenCounts(Protocol):
    """What usage needs of a choice: a streamed ``Delta`` or a whole ``Completion``."""

    completion_tokens: int
    cached_tokens: int


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, object]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def choices_usage(
    prompts: Sequence[PreparedRequest], n: int, results: Mapping[int, TokenCounts]
) -> dict[str, object]:
    """Usage over the choices of ``prompts`` x ``n`` (choice ``k * n + j`` is choice ``j`` of
    prompt ``k``): each prompt counted once, every choice's output, and each prompt's cached
    tokens once (the most any of its choices found). ``results`` may lack choices that have
    not answered yet."""
    prompt = sum(p.prompt_tokens for p in prompts)
    completion = sum(r.completion_tokens for r in results.values())
    cached = 0
    for k in range(len(prompts)):
        ours = [results[i] for i in range(k * n, (k + 1) * n) if i in results]
        cached += max((r.cached_tokens for r in ours), default=0)
    return usage_dict(prompt, completion, cached)


class TokenTexts:
    """Token id -> its text, cached: logprobs name tokens by text, not id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def chat_logprobs(self, items: list[TokenLogprob], top_n: int) -> list[dict[str, object]]:
        """Entries of ``choices[i].logprobs.content`` for a chat completion."""
        out = []
        for item in items:
            text = self(item.token_id)
            top = [
                {"token": (t := self(tid)), "logprob": lp, "bytes": list(t.encode())}
                for tid, lp in item.top[:top_n]
            ]
            out.append(
                {
                    "token": text,
                    "logprob": item.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": top,
                }
            )
        return out

    def completion_logprobs(
        self, items: list[TokenLogprob], top_n: int, offset: int
    ) -> tuple[dict[str, list[object]], int]:
        """``choices[i].logprobs`` for a text completion, and the text offset after it."""
        tokens: list[object] = []
        token_logprobs: list[object] = []
        tops: list[object] = []
        offsets: list[object] = []
        for item in items:
            text = self(item.token_id)
            tokens.append(text)
            token_logprobs.append(item.logprob)
            tops.append({self(tid): lp for tid, lp in item.top[:top_n]})
            offsets.append(offset)
            offset += len(text)
        block = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return block, offset


def _head(obj: str, request_id: str, created: int, model: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    """One entry of ``message.tool_calls``."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def assistant_message(r: Completion) -> dict[str, Any]:
    """``choices[i].message``: content (null when the answer is only tool calls), and the
    reasoning and tool calls when the request's parsers found any."""
    message: dict[str, Any] = {"role": "assistant", "content": r.text}
    if r.reasoning is not None:
        message["reasoning_content"] = r.reasoning
    if r.tool_calls:
        message["tool_calls"] = [tool_call_dict(c) for c in r.tool_calls]
        if not r.text.strip():
            message["content"] = None
    return message


def chat_completion_body(
    request_id: str,
    created: int,
    model: str,
    prompt: PreparedRequest,
    results: Sequence[Completion],
    texts: TokenTexts | None = None,
    top_n: int = 0,
) -> dict[str, Any]:
    """A ``chat.completion`` with one choice per result. ``texts`` is set when the request
    asked for logprobs; a choice without any (an engine that gives none) has null."""
    choices = []
    for i, r in enumerate(results):
        logprobs = None
        if texts is not None and r.logprobs:
            logprobs = {"content": texts.chat_logprobs(r.logprobs, top_n)}
        choices.append(
            {
                "index": i,
                "message": assistant_message(r),
                "logprobs": logprobs,
                "finish_reason": r.finish_reason,
            }
        )
    body = _head("chat.completion", request_id, created, model)
    body["choices"] = choices
    body["usage"] = choices_usage([prompt], len(results), dict(enumerate(results)))
    return body


def text_completion_body(
    request_id: str,
    created: int,
    model: str,
    prompts: Sequence[PreparedRequest],
    results: Sequence[Completion],
    echo: bool = False,
    texts: TokenTexts | None = None,
    top_n: int = 0,
) -> dict[str, Any]:
    """A ``text_completion`` for ``prompts`` x n choices (``results`` in the API's order).
    ``echo`` puts each prompt before its choices' text; ``texts`` as for chat."""
    n = len(results) // len(prompts)
    choices = []
    for i, r in enumerate(results):
        prefix = prompts[i // n].prompt_text if echo else ""
        logprobs = None
        if texts is not None and r.logprobs:
            logprobs, _ = texts.completion_logprobs(r.logprobs, top_n, len(prefix))
        choices.append(
            {
                "index": i,
                "text": prefix + r.text,
                "logprobs": logprobs,
                "finish_reason": r.finish_reason,
            }
        )
    body = _head("text_completion", request_id, created, model)
    body["choices"] = choices
    body["usage"] = choices_usage(prompts, n, dict(enumerate(results)))
    return body


def embedding_token_ids(client: ModelClient, req: EmbeddingRequest) -> list[list[int]]:
    """The token ids of each input of an embeddings request, checked against the model:
    not empty, within the context, inside the vocabulary (RequestError otherwise)."""
    inputs = req.input
    if isinstance(inputs, str):
        batch: list[Any] = [inputs]
    elif inputs and all(isinstance(x, int) for x in inputs):
        batch = [list(inputs)]
    else:
        batch = list(inputs)
    if not batch:
        raise RequestError("input is empty", param="input")
    ctx = client.card.context_length
    vocab = client.card.tokenizer.get_vocab_size()
    token_ids: list[list[int]] = []
    for item in batch:
        ids = client.preprocessor.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise RequestError("input contains an empty string or token list", param="input")
        if len(ids) > ctx:
            raise RequestError(
                f"an input has {len(ids)} tokens; this model's maximum context length is {ctx}",
                param="input",
                code="context_length_exceeded",
            )
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError("input contains a token id outside the vocabulary", param="input")
        token_ids.append(ids)
    return token_ids


def embedding_body(
    model: str,
    req: EmbeddingRequest,
    token_ids: list[list[int]],
    vectors: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """The embeddings ``list`` for the vectors of ``token_ids``; RequestError when the
    request asks for dimensions the model does not have."""
    if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
        raise RequestError(
            f"dimensions={req.dimensions} is not supported; this model's embeddings have "
            f"{len(vectors[0])} dimensions",
            param="dimensions",
        )
    data = []
    for i, vec in enumerate(vectors):
        value: list[float] | str = [float(v) for v in vec]
        if req.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": value})
    total = sum(len(ids) for ids in token_ids)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
