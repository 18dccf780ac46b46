"""Warnings about a failure that repeats in a background loop (lease renewal, KV event
publishing), shown without flooding the log, and counted for /metrics.

Such failures used to be logged at debug only, so a worker could drop out of discovery with
nothing shown. Now the first failure is a warning at once; while it keeps failing, at most
one line per ``every_s`` says how many failed since; the first success after a failure says
so once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DEFAULT_EVERY_S = 30.0


class FailureLog:
    """Rate-limited warnings and a running count for one kind of failure."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        every_s: float = DEFAULT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.what = what  # e.g. "discovery lease renewal"
        self.every_s = every_s
        self.clock = clock
        self.total = 0  # every failure so far (a counter for /metrics)
        self._streak = 0  # failures since the last success
        self._unreported = 0  # failures since the last warning
        self._warned_at: float | None = None

    def failed(self, exc: BaseException) -> bool:
        """Count one failure; True when it was logged (the first, or one per every_s)."""
        self.total += 1
        self._streak += 1
        self._unreported += 1
        now = self.clock()
        if self._warned_at is not None and now - self._warned_at < self.every_s:
            return False
        if self._streak == 1:
            self.log.warning("%s failed: %s", self.what, _describe(exc))
        else:
            self.log.warning(
                "%s failed %d more times (%d in a row): %s",
                self.what, self._unreported, self._streak, _describe(exc),
            )  # fmt: skip
        self._warned_at = now
        self._unreported = 0
        return True

    def succeeded(self) -> None:
        """A success: after failures, say once that it works again."""
        if self._streak:
            self.log.warning("%s works again after %d failures", self.what, self._streak)
        self._streak = 0
        self._unreported = 0
        self._warned_at = None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
