"""The keyword arguments of SGLang's ``Engine`` (its ``ServerArgs``) from a model card and
the command line, kept free of sglang imports so the mapping is testable anywhere.

``--extra-engine-args`` uses SGLang's own argument names (``mem_fraction_static``,
``attention_backend``, ...) and wins over what we derive, except ``model_path``, which
is MODEL.
"""

from __future__ import annotations

import json
from typing import Any

from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE
from dynamo_run.model.card import ModelCard

NAME = "sglang"


def check_model(card: ModelCard) -> None:
    """SGLang runs Hugging Face checkpoints; a GGUF is a one-line error, not a traceback
    from deep inside its loader."""
    if card.kind != "hf":
        raise EngineError(
            f"{NAME}: '{card.path}' is a GGUF file; out={NAME} runs Hugging Face models "
            "(a folder with config.json and safetensors, or a repo id); "
            "use out=llamacpp for GGUF"
        )


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"{NAME}: '{key}' must be a positive integer, got {value!r}")
    return value


def engine_kwargs(
    card: ModelCard, config: EngineConfig, kv_events_endpoint: str | None = None
) -> dict[str, Any]:
    """``ServerArgs`` keywords. ``page_size`` is the KV block size (``--kv-cache-block-size``,
    else ours, 16) so that one SGLang KV event block is one router block; a KV events
    publisher that connects to ``kv_events_endpoint`` is configured unless the user passed
    their own ``kv_events_config``."""
    extra = dict(config.extra or {})
    if "model_path" in extra:
        raise EngineError(
            f"{NAME}: give the model as MODEL, not as 'model_path' in the engine args"
        )
    kwargs: dict[str, Any] = {
        "model_path": str(card.path),
        "log_level": "error",
        "page_size": DEFAULT_BLOCK_SIZE,
    }
    if config.kv_cache_block_size is not None:
        kwargs["page_size"] = _positive_int("--kv-cache-block-size", config.kv_cache_block_size)
    if config.context_length is not None:
        kwargs["context_length"] = _positive_int("--context-length", config.context_length)
    tp = getattr(config, "tensor_parallel_size", None)
    if tp is not None:
        kwargs["tp_size"] = _positive_int("--tensor-parallel-size", tp)
    if kv_events_endpoint is not None and "kv_events_config" not in extra:
        kwargs["kv_events_config"] = json.dumps(
            {"publisher": "zmq", "endpoint": kv_events_endpoint, "topic": "kv-events"}
        )
    kwargs.update(extra)
    return kwargs


def page_size(kwargs: dict[str, Any]) -> int:
    """Tokens per KV block as SGLang will use them (extra args may override ours)."""
    return _positive_int("page_size", kwargs.get("page_size") or 1)


def publishes_to(kwargs: dict[str, Any], endpoint: str | None) -> bool:
    """Whether the events SGLang publishes will reach our subscriber at ``endpoint``."""
    if endpoint is None or not kwargs.get("kv_events_config"):
        return False
    try:
        return json.loads(kwargs["kv_events_config"]).get("endpoint") == endpoint
    except (TypeError, ValueError, AttributeError):
        return False
