"""An engine's start-up output in a log file, and the root cause read back from it.

Engines start worker or child processes that print progress, warnings and, when loading
fails, tracebacks on stderr; that would spoil the chat shell and the one-line error
dynamo-run promises. While an engine starts, file descriptor 2 goes to a log file, which
the children keep as their stderr, and when the start fails the last exception line that
says what went wrong (not a "see above" wrapper) is read back for the one-line error.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# An exception line anywhere in a log line (children prefix theirs with times and ranks).
EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def log_path(engine: str) -> Path:
    """This process's log file for ``engine``."""
    return Path(tempfile.gettempdir()) / f"dynamo-run-{engine}-{os.getpid()}.log"


@contextlib.contextmanager
def stderr_to(log_file: Path, enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 to ``log_file`` while an engine starts. Processes spawned
    meanwhile keep that file as their stderr, so what they print outside Python's logging
    (progress bars, C++ warnings, a traceback when they die) lands in the log rather than
    in the terminal. ``enabled=False`` leaves stderr alone (a user asked to see it)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def root_cause(
    log_file: Path,
    wrappers: tuple[str, ...] = (),
    pattern: re.Pattern[str] = EXCEPTION_LINE,
) -> str | None:
    """The last exception line in ``log_file`` (``pattern``: groups type and message) whose
    message does not start with one of ``wrappers``, the engine's messages that point at
    the real error rather than say it; as ``Type: message`` without the module path."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = pattern.search(line.strip())
        if match and not match.group(2).startswith(wrappers):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return None
