"""Starting TensorRT-LLM so that a failure is one line, not pages of worker output.

The LLM's executor runs in worker processes (MPI or multiprocessing) that print progress,
warnings and, when loading fails, tracebacks on stderr. While the LLM starts, file
descriptor 2 goes to a log file, which the workers keep as their stderr, and the root
cause of a failure is read back from it for the one-line error.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_EXC_LINE = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
# Wrappers that point at the real error rather than say it.
_WRAPPERS = ("Executor creation failed", "Failed to parse the arguments", "See above")


def log_path() -> Path:
    """This process's TensorRT-LLM log file."""
    return Path(tempfile.gettempdir()) / f"dynamo-run-trtllm-{os.getpid()}.log"


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 to ``path`` while TensorRT-LLM starts (its workers keep it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def root_cause(path: Path) -> str | None:
    """The last exception line in the log that says what went wrong, if any."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = _EXC_LINE.search(line.strip())
        if match and not match.group(2).startswith(_WRAPPERS):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return None
