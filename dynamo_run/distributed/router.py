"""Choosing an instance for a request: random or round-robin over the live instances of a
model, skipping those that just failed it. (KV-aware routing is a later mode.)"""

from __future__ import annotations

import random
from collections import defaultdict

from dynamo_run.distributed.wire import InstanceRecord


class Router:
    def __init__(self, mode: str = "round-robin", seed: int | None = None) -> None:
        if mode not in ("random", "round-robin"):
            raise ValueError(f"router mode {mode!r} is not available")
        self.mode = mode
        self._next: dict[str, int] = defaultdict(int)
        self._random = random.Random(seed)
        # Requests this frontend has in flight per instance (shown in metrics and `ps`).
        self.in_flight: dict[str, int] = defaultdict(int)

    def choose(
        self,
        model: str,
        instances: list[InstanceRecord],
        token_ids: list[int],
        exclude: set[str] | frozenset = frozenset(),
    ) -> tuple[InstanceRecord, int] | None:
        """Same interface as KvRouter.pick: (instance, cached blocks it is predicted to hold);
        these modes know nothing of caches."""
        record = self.pick(model, instances, exclude)
        return None if record is None else (record, 0)

    def pick(
        self, model: str, instances: list[InstanceRecord], exclude: set[str] | frozenset = ()
    ) -> InstanceRecord | None:
        """An instance of ``model``, or None when none is left to try."""
        candidates = [r for r in instances if r.instance_id not in exclude and not r.draining] or [
            r for r in instances if r.instance_id not in exclude
        ]
        if not candidates:
            return None
        candidates.sort(key=lambda r: r.instance_id)
        if self.mode == "random":
            return self._random.choice(candidates)
        index = self._next[model] % len(candidates)
        self._next[model] = index + 1
        return candidates[index]
