"""One batch input line -> a validated request, or the reason it cannot run.

Three forms are recognised per line: Dynamo's ``{"text": ...}``, a chat ``{"messages": ...}``
(both with optional sampling fields), and the OpenAI batch form that ``vllm run-batch``
reads (``custom_id``, ``method``, ``url``, ``body``). A line that cannot run still gets an
output line, so every failure here is a :class:`LineError` carried by the item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dynamo_run.pipeline.preprocess import Preprocessor
from dynamo_run.protocol import json_input
from dynamo_run.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from dynamo_run.spec import did_you_mean

FORM_TEXT = "text"  # Dynamo's {"text": ...}
FORM_CHAT = "chat"  # {"messages": [...]}
FORM_OPENAI = "openai"  # {"custom_id", "method", "url", "body"}

URL_CHAT = "/v1/chat/completions"
URL_COMPLETION = "/v1/completions"
URL_EMBEDDING = "/v1/embeddings"
OPENAI_URLS = (URL_CHAT, URL_COMPLETION, URL_EMBEDDING)
OPENAI_KEYS = frozenset({"custom_id", "method", "url", "body"})

# Sampling fields a text or chat line may carry (the OpenAI names).
SAMPLING_KEYS = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "ignore_eos",
        "min_tokens",
        "response_format",
        "model",  # accepted and ignored: a batch runs one model
    }
)
# Tool fields a text or chat line may carry, as in a chat completion's body.
TOOL_KEYS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
TEXT_KEYS = frozenset({"text"}) | SAMPLING_KEYS | TOOL_KEYS
CHAT_KEYS = frozenset({"messages"}) | SAMPLING_KEYS | TOOL_KEYS


class LineError(Exception):
    """Why one line cannot run; becomes that line's error output."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class BatchItem:
    """One non-blank input line, parsed. ``request`` is set unless ``error`` is."""

    line: int  # 1-based line number in the input file
    form: str
    request: BaseModel | None = None
    url: str | None = None  # OpenAI form: which endpoint
    custom_id: str | None = None  # OpenAI form
    prompt_text: str | None = None  # text/chat form: the prompt, echoed in the output
    error: LineError | None = None


def detect_form(obj: object) -> str | None:
    """The form of a decoded line, or None when it is none of the three."""
    if not isinstance(obj, dict):
        return None
    if OPENAI_KEYS & obj.keys():
        return FORM_OPENAI
    if "messages" in obj:
        return FORM_CHAT
    if "text" in obj:
        return FORM_TEXT
    return None


def _validation_message(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        where = f"{prefix}{where}" if where else prefix.rstrip(".") or "line"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], form: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        names = ", ".join(f"'{k}'{did_you_mean(k, sorted(allowed))}" for k in unknown)
        noun = "field" if len(unknown) == 1 else "fields"
        raise LineError(
            "invalid_request",
            f"unknown {noun} {names}; a {form} line takes {', '.join(sorted(allowed))}",
        )


def _chat_request(body: dict[str, Any], pre: Preprocessor, prefix: str) -> ChatCompletionRequest:
    try:
        req = ChatCompletionRequest.model_validate(pre.apply_template(body))
    except ValidationError as exc:
        raise LineError("invalid_request", _validation_message(exc, prefix)) from None
    if req.stream:
        raise LineError("invalid_request", f"{prefix}stream: streaming is not supported in a batch")
    return req


def _parse_text(obj: dict[str, Any], pre: Preprocessor) -> tuple[ChatCompletionRequest, str]:
    _check_keys(obj, TEXT_KEYS, "text")
    text = obj["text"]
    if not isinstance(text, str):
        raise LineError("invalid_request", "text: must be a string")
    body = {k: v for k, v in obj.items() if k != "text"}
    body["messages"] = [{"role": "user", "content": text}]
    return _chat_request(body, pre, ""), text


def _parse_chat(obj: dict[str, Any], pre: Preprocessor) -> tuple[ChatCompletionRequest, str]:
    _check_keys(obj, CHAT_KEYS, "chat")
    req = _chat_request(obj, pre, "")
    users = [m for m in req.messages if m.role == "user"]
    return req, (users[-1] if users else req.messages[-1]).text()


def _parse_openai(obj: dict[str, Any], item: BatchItem, pre: Preprocessor) -> BaseModel:
    custom_id = obj.get("custom_id")
    if isinstance(custom_id, str):
        item.custom_id = custom_id
    _check_keys(obj, OPENAI_KEYS, "OpenAI batch")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("invalid_request", "custom_id: required, a non-empty string")
    method = obj.get("method")
    if method != "POST":
        raise LineError("invalid_request", f"method: must be 'POST', got {method!r}")
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise LineError(
            "invalid_url", f"url: {url!r} is not supported; use one of {', '.join(OPENAI_URLS)}"
        )
    item.url = url
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", "body: required, a JSON object")
    if url == URL_CHAT:
        return _chat_request(body, pre, "body.")
    model = CompletionRequest if url == URL_COMPLETION else EmbeddingRequest
    merged = pre.apply_template(body) if url == URL_COMPLETION else body
    try:
        req = model.model_validate(merged)
    except ValidationError as exc:
        raise LineError("invalid_request", _validation_message(exc, "body.")) from None
    if isinstance(req, CompletionRequest) and req.stream:
        raise LineError("invalid_request", "body.stream: streaming is not supported in a batch")
    return req


def _raw_prompt(obj: dict[str, Any], form: str) -> str | None:
    """The prompt text of a text/chat line, read before validation."""
    if form == FORM_TEXT:
        text = obj.get("text")
        return text if isinstance(text, str) else None
    if form == FORM_CHAT and isinstance(obj.get("messages"), list):
        for message in reversed(obj["messages"]):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else None
    return None


def parse_line(raw: bytes, line: int, default_form: str, pre: Preprocessor) -> BatchItem:
    """Decode and validate one non-blank line. Never raises: errors ride on the item."""
    item = BatchItem(line=line, form=default_form)
    try:
        try:
            obj = json_input.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise LineError("invalid_json", "the line is not valid UTF-8") from None
        except json_input.JsonTooDeep as exc:
            raise LineError("invalid_json", f"invalid JSON: {exc}") from None
        except json.JSONDecodeError as exc:
            raise LineError(
                "invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from None
        form = detect_form(obj)
        if form is None:
            raise LineError(
                "invalid_request",
                "expected a JSON object with 'text', 'messages', or an OpenAI batch request "
                "('custom_id', 'method', 'url', 'body')",
            )
        item.form = form
        item.prompt_text = _raw_prompt(obj, form)  # kept on error lines too
        if form == FORM_TEXT:
            item.request, item.prompt_text = _parse_text(obj, pre)
        elif form == FORM_CHAT:
            item.request, item.prompt_text = _parse_chat(obj, pre)
        else:
            item.request = _parse_openai(obj, item, pre)
    except LineError as exc:
        item.error = exc
        item.request = None
    return item


def peek_custom_id(raw: bytes) -> str | None:
    """The custom_id of an OpenAI-form line, or None (for resume checks; never raises)."""
    try:
        obj = json_input.loads(raw)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
        return obj["custom_id"]
    return None


def peek_form(raw: bytes) -> str | None:
    """The form of a line if it decodes, else None (to pick the form of bad lines)."""
    try:
        return detect_form(json_input.loads(raw))
    except ValueError:
        return None
