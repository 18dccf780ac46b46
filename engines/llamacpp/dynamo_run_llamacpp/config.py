"""Engine settings: ``--extra-engine-args`` JSON checked against what llama.cpp accepts.

Kept free of llama_cpp imports so that bad arguments are reported before the model loads.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from typing import Any

from dynamo_run.engine import EngineConfig, EngineError

# The per-sequence context we allocate when nothing says otherwise: models often declare
# 32k-128k, and a KV cache that size per parallel sequence would waste memory.
DEFAULT_SEQ_CONTEXT = 4096
DEFAULT_PARALLEL = 4


@dataclass
class LlamaCppSettings:
    """Everything the engine needs to create its llama.cpp model and context."""

    n_parallel: int = DEFAULT_PARALLEL
    n_ctx: int = 0  # total KV cells over all sequences; 0 = n_parallel * per-sequence context
    n_batch: int = 512  # tokens per llama_decode call (decode tokens + prefill chunk)
    n_ubatch: int = 512
    n_threads: int = 0  # 0 = one per physical core we may use, as llama.cpp (default_threads)
    n_threads_batch: int = 0  # 0 = n_threads
    n_gpu_layers: int = -1  # -1 = all layers when a GPU backend is present
    flash_attn: bool | None = None  # None = let llama.cpp decide
    # One KV buffer shared by all sequences (each still limited to n_ctx / n_parallel)
    # instead of one per sequence. Per-sequence buffers make llama.cpp split a batch into
    # runs of consecutive sequence ids (a step whose sequences have a gap costs more), but
    # in a shared buffer every token's attention spans the cells of all sequences, cached
    # ones included: with 4 streaming clients a step took 27 ms shared vs 21 ms apart.
    kv_unified: bool = False
    # Take turns with the frontend instead of decoding while it runs (see scheduler.Handoff);
    # None = when llama.cpp's threads occupy every CPU we may use.
    lockstep: bool | None = None
    # Halve the threads while steps stall because other processes want the CPUs too
    # (thread_guard.py); None = when llama.cpp's threads occupy every CPU we may use.
    adaptive_threads: bool | None = None
    # Host memory for KV states of prompts whose slot was reused (prompt_cache.py); 0 = off.
    prompt_cache_mib: int = 1024
    seed: int | None = None  # default seed for requests that give none
    verbose: bool = False  # let llama.cpp log to stderr

    @property
    def seq_context(self) -> int:
        return self.n_ctx // self.n_parallel


_INT_KEYS = (
    "n_parallel",
    "n_ctx",
    "n_batch",
    "n_ubatch",
    "n_threads",
    "n_threads_batch",
    "prompt_cache_mib",
)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _physical_cores(cpus: set[int]) -> int:
    """Cores (not SMT siblings) among ``cpus``, from sysfs; 0 if it cannot tell."""
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            return 0
    return len(cores)


def usable_cpus() -> int:
    return _cpu_count()


def default_threads() -> int:
    """One thread per physical core we may use, as llama.cpp's own tools do: ggml's
    matrix kernels gain little from SMT siblings. On 2 cores, 2 threads decode 1.5x
    (one sequence) to 1.7x (four) faster than 1 (scripts/bench_engine_step.py decode);
    the frontend sharing those cores is handled by ``lockstep``."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return max(1, _cpu_count())
    return max(1, _physical_cores(cpus) or len(cpus))


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"llamacpp: '{key}' must be an integer, got {value!r}")
    if value < minimum:
        raise EngineError(f"llamacpp: '{key}' must be >= {minimum}, got {value}")
    return value


def parse_settings(card_context: int, config: EngineConfig) -> LlamaCppSettings:
    """Validate ``config.extra`` and fill in defaults. Raises EngineError naming bad keys."""
    extra = dict(config.extra or {})
    known = [f.name for f in fields(LlamaCppSettings)]
    unknown = [k for k in extra if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise EngineError(
            f"llamacpp: unknown engine argument(s) {', '.join(hints)}; "
            f"known: {', '.join(sorted(known))}"
        )
    s = LlamaCppSettings()
    minimums = {"n_parallel": 1, "n_ctx": 0, "n_batch": 1, "n_ubatch": 1}
    for key in _INT_KEYS:
        if key in extra:
            setattr(s, key, _as_int(key, extra[key], minimums.get(key, 0)))
    if "n_gpu_layers" in extra:
        s.n_gpu_layers = _as_int("n_gpu_layers", extra["n_gpu_layers"], -1)
    if "seed" in extra and extra["seed"] is not None:
        s.seed = _as_int("seed", extra["seed"], 0)
    for key in ("flash_attn", "verbose", "lockstep", "adaptive_threads", "kv_unified"):
        if key in extra and extra[key] is not None:
            if not isinstance(extra[key], bool):
                raise EngineError(f"llamacpp: '{key}' must be true or false, got {extra[key]!r}")
            setattr(s, key, extra[key])

    s.n_threads = s.n_threads or default_threads()
    s.n_threads_batch = s.n_threads_batch or s.n_threads
    fills_cpus = max(s.n_threads, s.n_threads_batch) >= usable_cpus()
    if s.lockstep is None:
        s.lockstep = fills_cpus
    if s.adaptive_threads is None:
        s.adaptive_threads = fills_cpus and max(s.n_threads, s.n_threads_batch) > 1
    if not s.n_ctx:
        per_seq = config.context_length or min(card_context, DEFAULT_SEQ_CONTEXT)
        s.n_ctx = s.n_parallel * per_seq
    if s.n_ctx < s.n_parallel * 16:
        raise EngineError(
            f"llamacpp: n_ctx {s.n_ctx} is too small for n_parallel {s.n_parallel} "
            "(each sequence needs at least 16 tokens of context)"
        )
    s.n_ubatch = min(s.n_ubatch, s.n_batch)
    return s
