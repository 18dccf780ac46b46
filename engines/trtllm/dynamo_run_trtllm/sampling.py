"""Our token-level request as the keywords of TensorRT-LLM's ``SamplingParams``.

A plain dict, so the mapping is testable without tensorrt_llm; tests build the real
``SamplingParams`` from it where the package is installed. ``None`` in our options means
"the engine's default", so those keys are left out.
"""

from __future__ import annotations

from typing import Any

from dynamo_run.protocol.internal import PreprocessedRequest

# Our option -> SamplingParams field, for the ones that map one to one.
_DIRECT = (
    "temperature",
    "top_p",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def sampling_kwargs(request: PreprocessedRequest, context_length: int) -> dict[str, Any]:
    """``SamplingParams`` keywords for one request. ``guided_decoding`` is given as the
    keywords of ``GuidedDecodingParams`` (the engine builds the object)."""
    s, stop = request.sampling, request.stop
    max_tokens = stop.max_tokens
    if max_tokens is None:  # TensorRT-LLM's default is 32: run to the context's end instead
        max_tokens = max(1, context_length - len(request.token_ids))
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        # We detokenize in the frontend; the perf metrics say how much prompt was cached.
        "detokenize": False,
        "return_perf_metrics": True,
    }
    for name in _DIRECT:
        value = getattr(s, name)
        if value is not None:
            params[name] = value
    if s.top_k is not None:
        params["top_k"] = max(0, s.top_k)  # 0: the whole vocabulary
    if stop.ignore_eos:
        # As the other engines: ignore_eos drops every stop token, the model's EOS included.
        params["ignore_eos"] = True
    elif stop.stop_token_ids:
        params["stop_token_ids"] = list(stop.stop_token_ids)
    if stop.min_tokens > 0:
        params["min_tokens"] = stop.min_tokens
    if request.logprobs is not None:
        # 0 asks TensorRT-LLM for nothing; 1 gives the chosen token's logprob (the stream
        # drops alternatives we were not asked for).
        params["logprobs"] = max(1, request.logprobs)
    if s.json_schema is not None:
        params["guided_decoding"] = {"json": s.json_schema}
    elif s.json_object:
        params["guided_decoding"] = {"json_object": True}
    return params
