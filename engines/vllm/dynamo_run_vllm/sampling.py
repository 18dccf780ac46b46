"""Our token-level request as vLLM's SamplingParams, and vLLM's outputs as ours.

Every field of SamplingOptions and StopConditions has a vLLM counterpart. Stop *strings* are
the frontend's (it detokenizes), so vLLM only sees stop token ids; ``detokenize=False``
keeps vLLM from decoding text nobody reads, and ``RequestOutputKind.DELTA`` makes each
output carry only the new tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dynamo_run.protocol.internal import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    PreprocessedRequest,
    TokenLogprob,
)

if TYPE_CHECKING:
    from vllm import SamplingParams

# vLLM's finish reasons (CompletionOutput.finish_reason) -> ours.
FINISH_REASONS = {
    "stop": FINISH_STOP,
    "length": FINISH_LENGTH,
    "abort": FINISH_CANCELLED,
    "error": FINISH_ERROR,
    "repetition": FINISH_STOP,
}


def sampling_params(request: PreprocessedRequest) -> SamplingParams:
    """The SamplingParams for one request; unset options keep vLLM's defaults."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    opts, stop = request.sampling, request.stop
    kwargs: dict[str, Any] = {
        "n": 1,
        # None: up to the context's end (vLLM fills in max_model_len - prompt length).
        "max_tokens": stop.max_tokens,
        "min_tokens": stop.min_tokens,
        "ignore_eos": stop.ignore_eos,
        # ignore_eos drops every stop token (the card's end-of-turn ids come as stop
        # tokens, and vLLM's own ignore_eos covers only its EOS), as the other engines do.
        "stop_token_ids": None if stop.ignore_eos else (list(stop.stop_token_ids) or None),
        "logprobs": request.logprobs,
        "detokenize": False,
        "output_kind": RequestOutputKind.DELTA,
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(opts, name)
        if value is not None:
            kwargs[name] = value
    if kwargs.get("top_k") is not None and kwargs["top_k"] <= 0:
        kwargs["top_k"] = 0  # OpenAI-style "no limit" (vLLM: 0 or -1)
    if opts.json_schema is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(json=json.dumps(opts.json_schema))
    elif opts.json_object:
        kwargs["structured_outputs"] = StructuredOutputsParams(json_object=True)
    return SamplingParams(**kwargs)


def token_logprobs(
    token_ids: list[int], positions: list[Mapping[int, Any] | None] | None, n_top: int
) -> list[TokenLogprob] | None:
    """Our per-token logprobs from vLLM's (one ``{token id: Logprob}`` per new token,
    holding the sampled token and the ``n_top`` best, ranked from 1)."""
    if positions is None:
        return None
    result = []
    for token_id, position in zip(token_ids, positions, strict=False):
        if not position:
            result.append(TokenLogprob(token_id=token_id, logprob=float("nan")))
            continue
        chosen = position.get(token_id)
        ranked = sorted(
            (lp.rank if lp.rank is not None else 1 << 30, tid, lp.logprob)
            for tid, lp in position.items()
        )
        top = [(tid, float(lp)) for rank, tid, lp in ranked if rank <= n_top][:n_top]
        result.append(
            TokenLogprob(
                token_id=token_id,
                logprob=float(chosen.logprob) if chosen is not None else float("nan"),
                top=top,
            )
        )
    return result
