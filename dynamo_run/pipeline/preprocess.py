"""OpenAI-shaped requests -> token-level engine requests (chat template, tokenisation,
sampling, stop rules), with the context-length check done once, here."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from dynamo_run.errors import RequestError
from dynamo_run.model.card import ModelCard
from dynamo_run.model.generation_defaults import GenerationDefaults, resolve_generation_defaults
from dynamo_run.model.template import TemplateError
from dynamo_run.pipeline.answer import OutputPlan
from dynamo_run.pipeline.chat_plan import Guidance, plan_chat
from dynamo_run.protocol import json_input
from dynamo_run.protocol.internal import PreprocessedRequest, SamplingOptions, StopConditions
from dynamo_run.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)


@dataclass
class PreparedRequest:
    """A token-level request plus what only the frontend needs to finish it."""

    engine_request: PreprocessedRequest
    stop_strings: list[str] = field(default_factory=list)
    prompt_text: str = ""
    # Chat only: the parsers that read the answer (reasoning, tool calls); None: plain text.
    plan: OutputPlan | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.engine_request.token_ids)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: text content, and tool calls whose arguments
    are objects (the API sends them as JSON text; HF templates apply ``tojson`` to them)."""
    out = {**message.model_dump(exclude_none=True), "content": message.text()}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                # Not JSON (or nested past the limit): the text as sent.
                with contextlib.suppress(ValueError):
                    fn = {**fn, "arguments": json_input.loads(fn["arguments"])}
                call = {**call, "function": fn}
            calls.append(call)
        out["tool_calls"] = calls
    return out


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Preprocessor:
    """Turns chat and completion requests into engine requests for one model card."""

    def __init__(
        self,
        card: ModelCard,
        request_template: dict[str, Any] | None = None,
        generation_config: str = "auto",
    ) -> None:
        self.card = card
        self.request_template = dict(request_template or {})
        self.defaults: GenerationDefaults = resolve_generation_defaults(
            card.generation_defaults,
            card.generation_defaults_source,
            self.request_template,
            generation_config,
        )

    # --- request defaults -------------------------------------------------------------
    def apply_template(self, body: dict[str, Any]) -> dict[str, Any]:
        """Merge ``--request-template`` defaults under the request's own fields."""
        if not self.request_template:
            return body
        merged = {k: v for k, v in self.request_template.items() if k != "messages"}
        merged.update({k: v for k, v in body.items() if v is not None})
        return merged

    # --- tokenisation -----------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.card.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.card.bos_token_id
        want_bos = self.card.add_bos_token if add_bos is None else add_bos
        if want_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def render_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> str:
        try:
            return self.card.chat_template.render(messages, add_generation_prompt=True, tools=tools)
        except TemplateError as exc:
            raise RequestError(str(exc), param="messages") from exc

    # --- building engine requests -----------------------------------------------------
    def check_token_ids(self, token_ids: list[int]) -> None:
        """Reject ids outside the vocabulary before anything decodes or runs them."""
        vocab = self.card.tokenizer.get_vocab_size()
        for tid in token_ids:
            if not 0 <= tid < vocab:
                raise RequestError(f"token id {tid} is outside the vocabulary", param="prompt")

    def _build(
        self,
        req: SamplingFields,
        token_ids: list[int],
        prompt_text: str,
        max_tokens: int | None,
        logprobs: int | None,
        json_object: bool,
        json_schema: dict[str, Any] | None = None,
    ) -> PreparedRequest:
        ctx = self.card.context_length
        if not token_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(token_ids) >= ctx:
            raise RequestError(
                f"This model's maximum context length is {ctx} tokens. However, your prompt "
                f"has {len(token_ids)} tokens; it must be shorter to leave room for output.",
                param="messages",
                code="context_length_exceeded",
            )
        room = ctx - len(token_ids)
        chosen = self.defaults.fill(
            {
                "temperature": req.temperature,
                "top_p": req.top_p,
                "top_k": req.top_k,
                "min_p": req.min_p,
                "repetition_penalty": req.repetition_penalty,
                "max_tokens": max_tokens,
            }
        )
        max_tokens = chosen.pop("max_tokens")
        limit = room if max_tokens is None else min(max_tokens, room)
        sampling = SamplingOptions(
            **chosen,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            json_object=json_object,
            json_schema=json_schema,
        )
        stop = StopConditions(
            max_tokens=limit,
            stop_token_ids=self.card.stop_token_ids,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
        )
        engine_request = PreprocessedRequest(
            request_id=new_request_id(),
            token_ids=token_ids,
            sampling=sampling,
            stop=stop,
            logprobs=logprobs,
            model=self.card.name,
        )
        return PreparedRequest(engine_request, req.stop_list(), prompt_text)

    def chat(self, req: ChatCompletionRequest, guidance: Guidance | None = None) -> PreparedRequest:
        """The engine request for a chat request. ``guidance`` (see ``ModelClient.prepare_chat``,
        which checks it against the engine) is worked out here when not given."""
        if guidance is None:
            guidance = plan_chat(req, self.card, can_object=True, can_schema=True)
        messages = [_template_message(m) for m in req.messages]
        prompt = self.render_chat(messages, tools=req.tools)
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prepared = self._build(
            req,
            self.encode(prompt),
            prompt,
            max_tokens,
            logprobs,
            guidance.json_object,
            guidance.json_schema,
        )
        prepared.plan = guidance.plan
        return prepared

    def completion(self, req: CompletionRequest) -> list[PreparedRequest]:
        """One prepared request per prompt (the API accepts a batch of prompts)."""
        prompts = req.prompt
        if isinstance(prompts, str):
            batch: list[str | list[int]] = [prompts]
        elif prompts and all(isinstance(p, int) for p in prompts):
            batch = [list(prompts)]  # type: ignore[arg-type]
        else:
            batch = list(prompts)  # type: ignore[arg-type]
        if not batch:
            raise RequestError("the prompt is empty", param="prompt")
        prepared = []
        for prompt in batch:
            if isinstance(prompt, str):
                ids, text = self.encode(prompt), prompt
            else:
                ids = list(prompt)
                self.check_token_ids(ids)
                text = self.card.tokenizer.decode(ids)
            prepared.append(self._build(req, ids, text, req.max_tokens, req.logprobs, False))
        return prepared
