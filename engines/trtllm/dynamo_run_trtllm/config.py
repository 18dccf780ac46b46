"""The keyword arguments of TensorRT-LLM's ``LLM`` from a model card and the command line,
kept free of tensorrt_llm imports so the mapping is testable anywhere.

``--extra-engine-args`` uses TensorRT-LLM's own argument names (``LlmArgs``:
``max_batch_size``, ``kv_cache_config``, ...) and wins over what we derive; a
``kv_cache_config`` given there is merged into ours key by key. ``model`` is MODEL.
"""

from __future__ import annotations

from typing import Any

from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.model.card import ModelCard

NAME = "trtllm"
# TensorRT-LLM's own default (its attention kernels are tuned for it), and Dynamo's for it;
# --kv-cache-block-size sets another.
DEFAULT_TOKENS_PER_BLOCK = 32
# KV events TensorRT-LLM keeps for us between polls; a full buffer drops the oldest.
EVENT_BUFFER = 4096


def check_model(card: ModelCard) -> None:
    """TensorRT-LLM runs Hugging Face checkpoints; a GGUF is a one-line error."""
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


def llm_kwargs(card: ModelCard, config: EngineConfig) -> dict[str, Any]:
    """``LLM`` keywords. ``kv_cache_config.tokens_per_block`` is the KV block size
    (``--kv-cache-block-size``, else TensorRT-LLM's 32), which is also the block size of
    the KV events we report (one TensorRT-LLM block is one router block); block reuse and the KV event buffer are on, for prefix caching and
    KV-aware routing; xgrammar serves json_object / json_schema; per-iteration stats feed
    ``load()``."""
    extra = dict(config.extra or {})
    if "model" in extra:
        raise EngineError(f"{NAME}: give the model as MODEL, not as 'model' in the engine args")
    block = DEFAULT_TOKENS_PER_BLOCK
    if config.kv_cache_block_size is not None:
        block = _positive_int("--kv-cache-block-size", config.kv_cache_block_size)
    kv_cache: dict[str, Any] = {
        "tokens_per_block": block,
        "enable_block_reuse": True,
        "event_buffer_max_size": EVENT_BUFFER,
    }
    user_kv = extra.pop("kv_cache_config", None)
    if user_kv is not None:
        if not isinstance(user_kv, dict):
            raise EngineError(f"{NAME}: 'kv_cache_config' must be an object, got {user_kv!r}")
        kv_cache.update(user_kv)
    kwargs: dict[str, Any] = {
        "model": str(card.path),
        "kv_cache_config": kv_cache,
        "guided_decoding_backend": "xgrammar",
        "enable_iter_perf_stats": True,
    }
    if config.context_length is not None:
        kwargs["max_seq_len"] = _positive_int("--context-length", config.context_length)
    tp = getattr(config, "tensor_parallel_size", None)
    if tp is not None:
        kwargs["tensor_parallel_size"] = _positive_int("--tensor-parallel-size", tp)
    kwargs.update(extra)
    return kwargs


def block_size(kwargs: dict[str, Any]) -> int:
    """Tokens per KV block as TensorRT-LLM will use them."""
    return _positive_int("tokens_per_block", kwargs["kv_cache_config"]["tokens_per_block"])


def context_length(card: ModelCard, kwargs: dict[str, Any]) -> int:
    """The longest sequence the engine runs: ``max_seq_len`` if given, else the model's."""
    return int(kwargs.get("max_seq_len") or card.context_length)
