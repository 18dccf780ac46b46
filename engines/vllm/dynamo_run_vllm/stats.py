"""The scheduler's own numbers (KV cache usage, running and waiting requests), as vLLM's
stat loggers receive them after each engine step; ``VllmEngine.load()`` reads them for
discovery and routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SchedulerSnapshot:
    """The latest SchedulerStats, reduced to what EngineLoad needs."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_hits: int = 0  # prompt tokens found in the prefix cache, all time
    prefix_queries: int = 0
    steps: int = 0


def stat_logger_factory(snapshot: SchedulerSnapshot) -> Any:
    """A vLLM per-engine stat logger factory that copies each step's SchedulerStats into
    ``snapshot`` (built lazily: it subclasses vLLM's StatLoggerBase)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            snapshot.running = scheduler_stats.num_running_reqs
            snapshot.waiting = scheduler_stats.num_waiting_reqs + getattr(
                scheduler_stats, "num_skipped_waiting_reqs", 0
            )
            snapshot.kv_usage = float(scheduler_stats.kv_cache_usage)
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                snapshot.prefix_hits += int(getattr(prefix, "hits", 0))
                snapshot.prefix_queries += int(getattr(prefix, "queries", 0))
            snapshot.steps += 1

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotLogger
