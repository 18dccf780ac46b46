"""vLLM's engine arguments from the model card, the command line and ``--extra-engine-args``.

``--extra-engine-args`` uses vLLM's own names (the fields of ``AsyncEngineArgs``, as in
``vllm serve --help`` with dashes as underscores); they win over what dynamo-run derives.
``--context-length`` is ``max_model_len``, ``--kv-cache-block-size`` is ``block_size``,
``--tensor-parallel-size`` is ``tensor_parallel_size``. KV events are always published on
a private ZMQ socket, so that the router sees vLLM's real cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import uuid
from typing import TYPE_CHECKING, Any

from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.engine_support.errors import one_line

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from dynamo_run.model.card import ModelCard

# Arguments dynamo-run owns: the model is the card's, and the frontend detokenizes.
_OWNED = ("model", "skip_tokenizer_init")


def kv_endpoints() -> tuple[str, str]:
    """Private IPC endpoints for vLLM's KV event publisher and its replay socket."""
    base = os.path.join(
        tempfile.gettempdir(), f"dynamo-run-vllm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    return f"ipc://{base}.kv", f"ipc://{base}.kv-replay"


def _unknown_keys(extra: dict[str, Any], known: list[str]) -> str | None:
    unknown = [key for key in extra if key not in known]
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (
        f"vllm: unknown engine argument(s) {', '.join(hints)}; --extra-engine-args takes "
        "vLLM's AsyncEngineArgs names (vllm serve's options with underscores)"
    )


def build_engine_args(
    card: ModelCard, config: EngineConfig, kv_endpoint: str, replay_endpoint: str, cpu: bool
) -> AsyncEngineArgs:
    """The AsyncEngineArgs to start vLLM with. Raises EngineError for bad arguments."""
    from vllm.config import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra = dict(config.extra or {})
    known = [f.name for f in dataclasses.fields(AsyncEngineArgs)]
    problem = _unknown_keys(extra, known)
    if problem:
        raise EngineError(problem)
    owned = [key for key in _OWNED if key in extra]
    if owned:
        raise EngineError(
            f"vllm: '{owned[0]}' is set by dynamo-run (MODEL and token-level requests); "
            "leave it out of --extra-engine-args"
        )
    kwargs: dict[str, Any] = {
        "model": str(card.path),
        "served_model_name": card.name,
        "max_model_len": config.context_length,
        "enable_prefix_caching": True,
        # Our own stat logger reads the scheduler's numbers (stats.py); vLLM's periodic
        # "throughput" lines and Prometheus registry are not wanted.
        "disable_log_stats": True,
        "kv_events_config": KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=kv_endpoint,
            replay_endpoint=replay_endpoint,
        ),
    }
    if cpu:
        # torch.compile on the CPU build takes minutes of start-up for a small gain with
        # small models; --extra-engine-args '{"enforce_eager": false}' turns it back on.
        kwargs["enforce_eager"] = True
    if config.tensor_parallel_size is not None:
        kwargs["tensor_parallel_size"] = config.tensor_parallel_size
    if config.kv_cache_block_size is not None:
        kwargs["block_size"] = config.kv_cache_block_size
    events = extra.get("kv_events_config")
    if isinstance(events, dict):
        extra["kv_events_config"] = KVEventsConfig(**events)
    structured = extra.get("structured_outputs_config")
    if isinstance(structured, dict):
        from vllm.config import StructuredOutputsConfig

        extra["structured_outputs_config"] = StructuredOutputsConfig(**structured)
    kwargs.update(extra)
    try:
        return AsyncEngineArgs(**kwargs)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"vllm: bad engine arguments: {one_line(exc)}") from exc
