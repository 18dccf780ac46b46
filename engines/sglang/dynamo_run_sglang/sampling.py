"""Our token-level request as SGLang's ``async_generate`` arguments.

The sampling dict uses the field names of ``sglang.srt.sampling.sampling_params
.SamplingParams`` (tests validate it with that class where sglang is installed). ``None``
in our options means "the engine's default", so those keys are left out.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from dynamo_run.protocol.internal import PreprocessedRequest

# Our option -> SGLang's SamplingParams field, for the ones that map one to one.
_DIRECT = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("min_p", "min_p"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repetition_penalty"),
)

# What SGLang's own OpenAI server sends for response_format json_object.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def sampling_params(request: PreprocessedRequest) -> dict[str, Any]:
    """SGLang's sampling dict for one request."""
    s, stop = request.sampling, request.stop
    params: dict[str, Any] = {"max_new_tokens": stop.max_tokens}
    for ours, theirs in _DIRECT:
        value = getattr(s, ours)
        if value is not None:
            params[theirs] = value
    if s.top_k is not None:
        params["top_k"] = s.top_k if s.top_k > 0 else -1  # 0 / -1: the whole vocabulary
    if s.seed is not None:
        params["sampling_seed"] = s.seed
    if stop.ignore_eos:
        # As the other engines: ignore_eos drops every stop token, the model's EOS included.
        params["ignore_eos"] = True
    elif stop.stop_token_ids:
        params["stop_token_ids"] = list(stop.stop_token_ids)
    if stop.min_tokens > 0:
        params["min_new_tokens"] = stop.min_tokens
    if s.json_schema is not None:
        params["json_schema"] = json.dumps(s.json_schema)
    elif s.json_object:
        params["json_schema"] = JSON_OBJECT_SCHEMA
    return params


def new_rid(request: PreprocessedRequest) -> str:
    """SGLang's request id: ours plus a suffix, because SGLang rejects a duplicate rid and
    a request id from a remote frontend need not be unique on this worker."""
    return f"{request.request_id}-{uuid.uuid4().hex[:8]}"


def generate_kwargs(request: PreprocessedRequest, rid: str) -> dict[str, Any]:
    """Keyword arguments of ``Engine.async_generate`` for one streamed request."""
    kwargs: dict[str, Any] = {
        "input_ids": list(request.token_ids),
        "sampling_params": sampling_params(request),
        "stream": True,
        "rid": rid,
    }
    if request.logprobs is not None:
        kwargs["return_logprob"] = True
        if request.logprobs > 0:
            kwargs["top_logprobs_num"] = request.logprobs
    return kwargs
