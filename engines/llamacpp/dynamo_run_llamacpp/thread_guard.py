"""Fewer llama.cpp threads while other processes crowd the CPUs, all of them again after.

ggml's threads meet at a spinning barrier after every operation of the graph, hundreds of
times per step. When the threads fill every core and other processes want CPU too, a
thread that the kernel preempts leaves the others spinning for its whole time slice at
each barrier: on 2 cores with two busy neighbours a 7 ms step was measured taking 0.1-3 s.
Half the threads finish such a step in a normal time, so when decode-only steps take many
times longer than they usually do, the guard halves the threads, and from time to time
tries one step with more again (waiting longer after each failed try).
"""

from __future__ import annotations

import time
from collections.abc import Callable

STALL_FACTOR = 4.0  # a step this many times slower than usual counts as stalled
STALL_STEPS = 2  # consecutive stalled steps before threads are halved
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 48.0
BASE_DRIFT = 1.002  # how fast "usual" may rise per step (the machine may slow down)


class ThreadGuard:
    """Watches decode-only step times; says when to change the thread count."""

    def __init__(self, full: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.full = full
        self.current = full
        self.clock = clock
        self.usual: dict[tuple[int, int], float] = {}  # (threads, batch size) -> seconds
        self.stalled = 0
        self.retry_s = FIRST_RETRY_S
        self.retry_at = 0.0
        self.trying = False  # the last change was a try with more threads
        self.switches = 0

    def observe(self, batch: int, seconds: float) -> int | None:
        """Record one decode-only step of ``batch`` sequences run with ``self.current``
        threads; returns the thread count to use from now on when it should change."""
        key = (self.current, batch)
        usual = self.usual.get(key)
        slow = usual is not None and seconds > STALL_FACTOR * usual
        self.usual[key] = seconds if usual is None else min(usual * BASE_DRIFT, seconds)
        if self.trying:  # one step with more threads decides
            self.trying = False
            fewer = self.usual.get((max(1, self.current // 2), batch))
            if slow or (fewer is not None and seconds > fewer):
                self.retry_s = min(MAX_RETRY_S, 2 * self.retry_s)
                return self._switch(max(1, self.current // 2))
            self.retry_s = FIRST_RETRY_S
            return None
        self.stalled = self.stalled + 1 if slow else 0
        if self.stalled >= STALL_STEPS and self.current > 1:
            return self._switch(max(1, self.current // 2))
        if self.current < self.full and self.clock() >= self.retry_at:
            self.trying = True
            return self._switch(min(self.full, 2 * self.current))
        return None

    def _switch(self, threads: int) -> int:
        if threads < self.current:
            self.retry_at = self.clock() + self.retry_s
        self.stalled = 0
        self.current = threads
        self.switches += 1
        return threads
