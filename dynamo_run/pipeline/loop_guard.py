"""Notice when an answer has fallen into a loop, so that the chat shell can stop it.

Small models at low temperature sometimes repeat one phrase for ever (``la Femme, la Femme,
...``). Without a limit such an answer runs until the context is full, minutes of output no
one wants. The guard watches the generated token ids: when the tail of the answer is one
unit of ``period`` tokens repeated back to back, at least ``min_repeats`` times and over at
least ``min_span`` tokens, it reports a loop. Natural text almost never repeats a span that
long exactly; a markdown table's separator row is periodic but far shorter.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_MAX_PERIOD = 64  # the longest repeated unit looked for, in tokens
DEFAULT_MIN_REPEATS = 4
DEFAULT_MIN_SPAN = 48  # tokens of repetition before a loop is called


class LoopGuard:
    """Feeds on an answer's token ids; ``looping`` turns true once the tail is a loop.

    For each candidate period ``p`` it keeps how many trailing tokens equal the token ``p``
    places earlier, so each new token costs O(max_period) integer comparisons."""

    def __init__(
        self,
        max_period: int = DEFAULT_MAX_PERIOD,
        min_repeats: int = DEFAULT_MIN_REPEATS,
        min_span: int = DEFAULT_MIN_SPAN,
    ) -> None:
        if max_period < 1 or min_repeats < 2 or min_span < 2:
            raise ValueError("loop guard: max_period >= 1, min_repeats >= 2, min_span >= 2")
        self.max_period = max_period
        self.min_repeats = min_repeats
        self.min_span = min_span
        self._tokens: list[int] = []
        self._runs = [0] * (max_period + 1)  # _runs[p]: trailing matches at distance p
        self.period: int | None = None  # the repeated unit's length once looping

    @property
    def looping(self) -> bool:
        return self.period is not None

    def feed(self, token_ids: Iterable[int]) -> bool:
        """Add tokens; True once the answer loops (and from then on)."""
        tokens, runs = self._tokens, self._runs
        for token in token_ids:
            tokens.append(token)
            n = len(tokens) - 1
            for p in range(1, min(self.max_period, n) + 1):
                runs[p] = runs[p] + 1 if tokens[n - p] == token else 0
                if self.period is None and self._is_loop(p, runs[p]):
                    self.period = p
        if len(tokens) > 4 * self.max_period + self.min_span:  # only the tail matters
            del tokens[: len(tokens) - 2 * self.max_period]
        return self.looping

    def _is_loop(self, period: int, run: int) -> bool:
        span = run + period  # the repeated stretch: the first unit plus every match after it
        return span >= self.min_span and span >= self.min_repeats * period
