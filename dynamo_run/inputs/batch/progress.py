"""Progress and the final summary of a batch, on stderr.

A rich progress bar (rate, ETA) when stderr is a terminal; otherwise one plain line every
few seconds or every 10%, which reads well in logs and CI. Counts come from the written
output lines, so the summary agrees with the output file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dynamo_run.inputs.batch.records import Outcome

PLAIN_INTERVAL_S = 5.0
MIN_PLAIN_GAP_S = 1.0  # a 10% step prints at most once a second


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    @property
    def lines(self) -> int:
        return self.ok + self.failed

    def add(self, result: Outcome) -> None:
        self.ok += result.ok
        self.failed += not result.ok
        self.tokens_in += result.tokens_in
        self.tokens_out += result.tokens_out


def _duration(seconds: float) -> str:
    """Seconds with two decimals (for scripts), plus h/m/s past a minute (for people)."""
    text = f"{seconds:.2f} s"
    if seconds >= 60:
        minutes, secs = divmod(int(seconds), 60)
        hours, minutes = divmod(minutes, 60)
        text += f" ({hours}h{minutes:02d}m{secs:02d}s)" if hours else f" ({minutes}m{secs:02d}s)"
    return text


class BatchProgress:
    """Tracks this run's lines; shows progress while running and a summary at the end."""

    def __init__(
        self,
        total: int,
        before: Tally,
        output: Path,
        stream: TextIO | None = None,
        interval: float = PLAIN_INTERVAL_S,
    ) -> None:
        self.total = total
        self.before = before
        self.output = output
        self.stream = stream or sys.stderr
        self.interval = interval
        self.now = Tally()
        self.start = time.perf_counter()
        self._last_print = self.start
        self._last_decile = -1
        self._bar = None
        self._task = None

    # --- while running ------------------------------------------------------------------
    def begin(self) -> None:
        """Start the clock (after the model has loaded) and the bar on a terminal."""
        self.start = self._last_print = time.perf_counter()
        remaining = self.total - self.before.lines
        if remaining <= 0:
            return
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._task = self._bar.add_task(
                "batch", total=self.total, completed=self.before.lines, stats=""
            )
            self._bar.start()
        else:
            self._print(f"batch: {remaining} of {self.total} lines to run -> {self.output}")

    def update(self, result: Outcome) -> None:
        self.now.add(result)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, stats=self._rates())
            return
        now = time.perf_counter()
        done = self.before.lines + self.now.lines
        decile = done * 10 // max(self.total, 1)
        since = now - self._last_print
        if (
            since >= self.interval
            or (decile > self._last_decile and since >= MIN_PLAIN_GAP_S)
            or done == self.total
        ):
            self._last_print = now
            self._last_decile = decile
            self._print(self._plain_line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def _rates(self) -> str:
        elapsed = self.elapsed
        failed = self.before.failed + self.now.failed
        parts = [
            f"{self.now.lines / elapsed:.2f} lines/s",
            f"{self.now.tokens_out / elapsed:.1f} tok/s",
        ]
        if failed:
            parts.append(f"{failed} failed")
        return ", ".join(parts)

    def _plain_line(self) -> str:
        done = self.before.lines + self.now.lines
        pct = 100 * done // max(self.total, 1)
        line = f"batch: {done}/{self.total} lines ({pct}%), {self._rates()}"
        rate = self.now.lines / self.elapsed
        if rate > 0 and done < self.total:
            line += f", ETA {_duration((self.total - done) / rate)}"
        return line

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    # --- at the end ---------------------------------------------------------------------
    def summary(self, interrupted: bool = False) -> None:
        self.close()
        ok = self.before.ok + self.now.ok
        failed = self.before.failed + self.now.failed
        lines = ok + failed
        head = f"batch: {lines} of {self.total} lines: {ok} ok, {failed} failed"
        if self.before.lines:
            head += f" ({self.before.lines} done in an earlier run)"
        self._print(f"{head} -> {self.output}")
        elapsed = self.elapsed
        now = self.now
        self._print(
            f"batch: this run: {now.lines} lines in {_duration(elapsed)}, "
            f"{now.lines / elapsed:.2f} requests/s; tokens in {now.tokens_in}, "
            f"out {now.tokens_out}, {now.tokens_out / elapsed:.1f} tokens/s out, "
            f"{(now.tokens_in + now.tokens_out) / elapsed:.1f} tokens/s total"
        )
        if interrupted:
            self._print("batch: interrupted; rerun the same command to finish the rest")
        elif failed:
            self._print(f"batch: {failed} failed lines carry their error in {self.output}")
