"""Admission control: how many requests a model takes in before it answers 503.

A model's capacity is the requests its workers decode at once: per worker its decode slots
(the engine's ``max_num_seqs`` / ``n_parallel``), or ``--max-inflight-per-worker``; a worker
over ``--active-decode-blocks-threshold`` counts as none. Beyond the capacity requests wait
(in the frontend for remote workers, in the engine's own queue for a local one), up to
``--request-queue-limit`` of them (default: twice the capacity, as Dynamo's backend
admission gate); past that a request is refused at once with 503 and ``Retry-After``, which
a client can act on, rather than waiting minutes behind work it cannot see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynamo_run.engine import Capacity, Engine
from dynamo_run.pipeline.client import EngineUnavailable

if TYPE_CHECKING:
    from dynamo_run.spec import Flags

RETRY_AFTER_S = 1
__all__ = ["Capacity"]  # re-exported: admission's unit, declared with the engine contract


class Overloaded(EngineUnavailable):
    """Every worker of the model is busy and its queue is full: HTTP 503 + Retry-After."""


@dataclass(frozen=True)
class AdmissionSettings:
    """The flags, as given (None: the default)."""

    worker_limit: int | None = None  # --max-inflight-per-worker: None = its slots, 0 = no limit
    queue_limit: int | None = None  # --request-queue-limit: None = twice the capacity
    decode_blocks_threshold: float | None = None  # --active-decode-blocks-threshold (0-1)

    @classmethod
    def from_flags(cls, flags: Flags) -> AdmissionSettings:
        return cls(
            flags.max_inflight_per_worker,
            flags.request_queue_limit,
            flags.active_decode_blocks_threshold,
        )

    def limit_of(self, slots: int) -> int:
        """Requests one worker with ``slots`` decode slots takes at once; 0: no limit."""
        if self.worker_limit is not None:
            return self.worker_limit
        return max(0, slots)

    def blocks_busy(self, used: int, total: int) -> bool:
        """Whether a worker reporting ``used`` of ``total`` KV blocks is over the threshold."""
        threshold = self.decode_blocks_threshold
        return threshold is not None and total > 0 and used >= threshold * total


def local_capacity(engine: Engine, settings: AdmissionSettings) -> Capacity | None:
    """A local engine as one worker; None when its capacity is unknown (no limit)."""
    load = engine.load()
    slots = load.slots_total or engine.capabilities().max_concurrency or 0
    limit = settings.limit_of(slots)
    if limit <= 0:
        return None
    busy = settings.blocks_busy(load.kv_blocks_used, load.kv_blocks_total)
    return Capacity(0 if busy else limit, limit)


def capacity_of(engine: Engine, settings: AdmissionSettings) -> Callable[[], Capacity | None]:
    """How to ask for ``engine``'s capacity: a remote engine knows its live workers' own
    (it was built with the same settings); a local one is judged from its load."""
    if engine.capabilities().remote:
        return engine.capacity
    return lambda: local_capacity(engine, settings)


class Admission:
    """Counts one model's requests from admission to their end, and refuses one that would
    go past the capacity plus the queue."""

    def __init__(
        self, capacity: Callable[[], Capacity | None], settings: AdmissionSettings, model: str
    ) -> None:
        self.capacity = capacity
        self.settings = settings
        self.model = model
        self.admitted = 0  # engine requests (choices) admitted and not yet ended

    def check(self, n: int = 1) -> None:
        """Raise Overloaded if ``n`` more engine requests would not be admitted now (an
        idle model admits any request, however many choices it has). Cheap: the server
        asks before it templates and tokenises, so refusing costs little under overload."""
        if not self.admitted:
            return
        cap = self.capacity()
        if cap is None:
            return
        queue = self.settings.queue_limit
        if queue is None:
            queue = 2 * cap.nominal
        if self.admitted + n > cap.now + queue:
            waiting = max(0, self.admitted - cap.now)
            raise Overloaded(
                f"model `{self.model}` is overloaded: its workers are busy and {waiting} "
                f"requests wait (--request-queue-limit {queue}); retry in {RETRY_AFTER_S} s"
            )

    def enter(self, n: int = 1) -> Ticket:
        """Admit ``n`` engine requests (the choices of one HTTP request) or raise Overloaded."""
        self.check(n)
        self.admitted += n
        return Ticket(self, n)


class Ticket:
    """One admitted HTTP request; ``release`` (idempotent) when its answer ends."""

    __slots__ = ("_admission", "_n")

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission = admission
        self._n = n

    def release(self) -> None:
        if self._n:
            self._admission.admitted -= self._n
            self._n = 0
