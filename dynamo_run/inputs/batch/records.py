"""The shape of batch output lines, and what a written line says about its outcome.

Text and chat lines get Dynamo's fields (``text``, ``response``, ``tokens_in``,
``tokens_out``, ``elapsed_ms``, ``finish_reason``) plus ``line`` (the 1-based input line) and
``error`` (null, or the message). OpenAI-form lines get exactly the OpenAI batch output line.
The same reader (:func:`outcome`) counts fresh and resumed lines, so the summary always
agrees with the file.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from dynamo_run.inputs.batch.lines import FORM_OPENAI, BatchItem, LineError


@dataclass(frozen=True)
class Outcome:
    """What one output line counts for in the summary."""

    ok: bool
    tokens_in: int = 0
    tokens_out: int = 0


def text_record(
    item: BatchItem,
    response: str | None,
    tokens_in: int = 0,
    tokens_out: int = 0,
    elapsed_ms: int = 0,
    finish_reason: str | None = None,
    error: str | None = None,
    worker_id: str | None = None,
) -> dict[str, Any]:
    record = {
        "line": item.line,
        "text": item.prompt_text,
        "response": response,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "elapsed_ms": elapsed_ms,
        "finish_reason": finish_reason,
        "error": error,
    }
    if worker_id is not None:  # out=dyn: the worker instance that answered
        record["instance_id"] = worker_id
    return record


def openai_record(
    item: BatchItem,
    body: dict[str, Any] | None,
    request_id: str | None = None,
    error: LineError | None = None,
) -> dict[str, Any]:
    response = None
    if body is not None:
        response = {
            "status_code": 200,
            "request_id": request_id or f"req-{uuid.uuid4().hex[:24]}",
            "body": body,
        }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": item.custom_id,
        "response": response,
        "error": None if error is None else {"code": error.code, "message": error.message},
    }


def error_record(item: BatchItem, error: LineError) -> dict[str, Any]:
    """The output line of a line that failed, in the shape of its form."""
    if item.form == FORM_OPENAI:
        return openai_record(item, None, error=error)
    return text_record(item, None, error=error.message)


def is_openai_record(record: dict[str, Any]) -> bool:
    return "custom_id" in record and "line" not in record


def outcome(record: dict[str, Any]) -> Outcome:
    """Success and token counts of a written output line, whichever its form."""
    if is_openai_record(record):
        response = record.get("response")
        ok = record.get("error") is None and isinstance(response, dict)
        ok = ok and response.get("status_code") == 200  # type: ignore[union-attr]
        usage = (response or {}).get("body", {}) or {}
        usage = usage.get("usage", {}) if isinstance(usage, dict) else {}
        usage = usage if isinstance(usage, dict) else {}
        return Outcome(
            ok,
            int(usage.get("prompt_tokens", 0) or 0),
            int(usage.get("completion_tokens", 0) or 0),
        )
    return Outcome(
        record.get("error") is None,
        int(record.get("tokens_in", 0) or 0),
        int(record.get("tokens_out", 0) or 0),
    )


def record_matches(record: dict[str, Any], line: int, custom_id: str | None) -> bool:
    """Whether a written output line belongs to input line ``line`` (for resume)."""
    if is_openai_record(record):
        return record.get("custom_id") == custom_id
    return record.get("line") == line
