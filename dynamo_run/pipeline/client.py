"""The client every input calls: prepared request -> engine -> text deltas with usage.

Closing the returned stream (client hung up, Ctrl-C, stop string matched) closes the
engine's generator, which is how cancellation reaches the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dynamo_run.engine import Engine
from dynamo_run.errors import RequestError
from dynamo_run.model.card import ModelCard
from dynamo_run.parsers import ToolCall, ToolCallDelta
from dynamo_run.pipeline.answer import AnswerParser, Parsed, ToolCallJoin
from dynamo_run.pipeline.chat_plan import plan_chat
from dynamo_run.pipeline.postprocess import (
    IncrementalDetokenizer,
    StopStringMatcher,
    openai_finish_reason,
)
from dynamo_run.pipeline.preprocess import PreparedRequest, Preprocessor
from dynamo_run.protocol.internal import FINISH_ERROR, TokenLogprob
from dynamo_run.protocol.openai import ChatCompletionRequest


class EngineFailure(RuntimeError):
    """The engine reported an error for this request (HTTP 500 / a failed batch line)."""


class EngineUnavailable(EngineFailure):
    """No engine can take the request now (no live worker for the model): HTTP 503."""


@dataclass
class Delta:
    """A piece of one answer. The last delta has ``finish_reason`` and final usage."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str | None = None  # the remote instance serving it, where there is one
    # With a reasoning / tool-call parser: the reasoning text, and pieces of tool calls
    # (``text`` is then the content left once they are taken out).
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None


@dataclass
class Completion:
    """A whole answer, for callers that do not stream."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    time_to_first_token: float | None = None
    elapsed: float = 0.0
    worker_id: str | None = None
    reasoning: str | None = None  # None: no reasoning parser, or no reasoning in the answer
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: Delta, calls: ToolCallJoin) -> None:
        """Take in the parsed parts of one delta (text is joined by the caller)."""
        if delta.reasoning:
            self.reasoning = (self.reasoning or "") + delta.reasoning
        if delta.tool_calls:
            calls.add(delta.tool_calls)
            self.tool_calls = calls.calls()


class ModelClient:
    """Serves one model card with one engine (local, or a router over remote workers)."""

    def __init__(
        self,
        card: ModelCard,
        engine: Engine,
        request_template: dict[str, Any] | None = None,
        generation_config: str = "auto",
    ) -> None:
        self.card = card
        self.engine = engine
        self.preprocessor = Preprocessor(card, request_template, generation_config)
        self.engine_name = ""  # the engine's registered name, where known

    def prepare_chat(self, req: ChatCompletionRequest) -> PreparedRequest:
        """A chat request checked against what this engine can do (tools, JSON formats),
        templated and tokenised; RequestError (HTTP 400) when it cannot be served."""
        can = self.engine.capabilities()
        guidance = plan_chat(
            req,
            self.card,
            can_object=can.json_object,
            can_schema=can.json_schema,
            engine=self.engine_name,
        )
        if guidance.json_schema is not None:
            problem = self.engine.check_json_schema(guidance.json_schema)
            if problem:
                param = "tools" if guidance.plan and guidance.plan.forced else "response_format"
                raise RequestError(f"the JSON schema cannot be enforced: {problem}", param=param)
        return self.preprocessor.chat(req, guidance)

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[Delta]:
        """Run one prepared request, yielding text deltas as they are ready."""
        request = prepared.engine_request
        detok = IncrementalDetokenizer(self.card.tokenizer, request.token_ids)
        stops = StopStringMatcher(prepared.stop_strings)
        parser = AnswerParser(prepared.plan) if prepared.plan is not None else None
        held: list[int] = []  # token ids of text the parsers hold back, sent with the next delta
        prompt_tokens = len(request.token_ids)
        generated = 0
        cached = 0
        worker: str | None = None
        outputs = self.engine.generate(request)
        try:
            async for out in outputs:
                if out.finish_reason == FINISH_ERROR or out.error:
                    raise EngineFailure(out.error or "the engine failed")
                if out.cached_tokens is not None:
                    cached = out.cached_tokens
                if out.worker_id is not None:
                    worker = out.worker_id
                generated += len(out.token_ids)
                text, stopped = stops.push(detok.add(out.token_ids))
                finish = "stop" if stopped else openai_finish_reason(out.finish_reason)
                if finish is not None and not stopped:
                    text += stops.flush()
                parsed = None
                if parser is not None:
                    parsed, finish = _parse(parser, text, finish)
                    text = parsed.content
                if (
                    text
                    or finish
                    or out.logprobs
                    or (parsed and (parsed.reasoning or parsed.tool_calls))
                ):
                    delta = Delta(
                        text,
                        held + out.token_ids if held else out.token_ids,
                        finish,
                        out.logprobs,
                        prompt_tokens,
                        generated,
                        cached,
                        worker,
                    )
                    if parsed is not None:
                        delta.reasoning = parsed.reasoning
                        delta.tool_calls = parsed.tool_calls or None
                    held = []
                    yield delta
                elif parser is not None:  # the parsers hold this text back for now
                    held.extend(out.token_ids)
                if finish is not None:
                    return
            # The engine ended without a finish reason: treat as a normal stop.
            last = Delta(
                stops.flush(), held, "stop", None, prompt_tokens, generated, cached, worker
            )
            if parser is not None:
                parsed, last.finish_reason = _parse(parser, last.text, "stop")
                last.text, last.reasoning = parsed.content, parsed.reasoning
                last.tool_calls = parsed.tool_calls or None
            yield last
        finally:
            await outputs.aclose()

    async def complete(self, prepared: PreparedRequest) -> Completion:
        """Run one prepared request to the end and return the whole answer."""
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        last = Delta("")
        answer = Completion("", None, 0, 0)
        calls = ToolCallJoin()
        async for delta in self.stream(prepared):
            if first is None and delta.token_ids:
                first = time.perf_counter() - start
            parts.append(delta.text)
            token_ids.extend(delta.token_ids)
            if delta.logprobs:
                logprobs.extend(delta.logprobs)
            answer.add(delta, calls)
            last = delta
        return Completion(
            text="".join(parts),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens or prepared.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            token_ids=token_ids,
            logprobs=logprobs,
            time_to_first_token=first,
            elapsed=time.perf_counter() - start,
            worker_id=last.worker_id,
            reasoning=answer.reasoning,
            tool_calls=answer.tool_calls,
        )


def _parse(parser: AnswerParser, text: str, finish: str | None) -> tuple[Parsed, str | None]:
    """Run ``text`` through the answer's parsers (and flush them on the last delta); a
    finished answer that made tool calls ends with finish_reason ``tool_calls``."""
    parsed = parser.feed(text)
    if finish is None:
        return parsed, None
    tail = parser.finish()
    parsed = Parsed(
        parsed.reasoning + tail.reasoning,
        parsed.content + tail.content,
        parsed.tool_calls + tail.tool_calls,
    )
    if finish == "stop" and parser.called:
        finish = "tool_calls"
    return parsed, finish


def copy_for_choice(prepared: PreparedRequest, index: int) -> PreparedRequest:
    """The same request for choice ``index`` of ``n``: its own id, and seed + index so that
    seeded choices differ from each other but stay reproducible."""
    if index == 0:
        return prepared
    req = prepared.engine_request
    sampling = req.sampling
    if sampling.seed is not None:
        sampling = msgspec.structs.replace(sampling, seed=sampling.seed + index)
    new_req = msgspec.structs.replace(
        req, request_id=f"{req.request_id}-{index}", sampling=sampling
    )
    return PreparedRequest(
        new_req, list(prepared.stop_strings), prepared.prompt_text, prepared.plan
    )
