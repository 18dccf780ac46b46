"""The loop guard: phrase loops are caught early; ordinary answers never are."""

from __future__ import annotations

import pytest

from dynamo_run.pipeline.loop_guard import LoopGuard


def feed_one_by_one(guard: LoopGuard, tokens: list[int]) -> int | None:
    """Feed tokens one at a time; the index of the token at which the guard fired."""
    for i, token in enumerate(tokens):
        if guard.feed([token]):
            return i
    return None


@pytest.mark.parametrize("period", [1, 3, 4, 17, 64])
def test_a_repeated_phrase_is_a_loop_soon_after_min_span(period: int) -> None:
    prefix = list(range(1000, 1030))
    unit = list(range(period))
    tokens = prefix + unit * 200
    guard = LoopGuard()
    fired = feed_one_by_one(guard, tokens)
    assert fired is not None
    span = max(guard.min_span, guard.min_repeats * period)
    assert fired == len(prefix) + span - 1  # exactly when the repeated stretch is long enough
    assert guard.period is not None and period % guard.period == 0


def test_text_that_never_repeats_exactly_is_not_a_loop() -> None:
    # A counting answer: similar shape on every line, never the same tokens.
    tokens: list[int] = []
    for n in range(500):
        tokens += [7, 8, 1000 + n, 9]
    assert feed_one_by_one(LoopGuard(), tokens) is None


def test_short_repetition_is_allowed() -> None:
    # A table separator row: periodic, but far shorter than min_span.
    row = [5, 6] * 10
    tokens = [1, 2, 3, *row, 4, 9, 10, 11, *row, 12]
    assert feed_one_by_one(LoopGuard(), tokens) is None


def test_a_long_unit_needs_min_repeats() -> None:
    unit = list(range(40))
    guard = LoopGuard()
    assert not guard.feed(unit * 3)  # 120 tokens, but only three repeats
    assert guard.feed(unit)  # the fourth


def test_batched_deltas_and_a_long_answer_keep_working() -> None:
    guard = LoopGuard()
    tokens = list(range(5000))  # long and loop-free: the tail buffer is trimmed as it goes
    for i in range(0, len(tokens), 7):
        assert not guard.feed(tokens[i : i + 7])
    assert guard.feed([1, 2, 3] * 40)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopGuard(min_repeats=1)
