"""Starting SGLang so that a failure is one line, not a dead process or a traceback.

SGLang's scheduler and detokenizer are child processes. When one fails while loading (out
of GPU memory, an unsupported model) it logs a traceback to stderr and sends SIGQUIT to
the parent, whose launch-time handler kills the whole process tree; off the main thread
(dynamo-run loads engines in a worker thread) no handler is installed and SIGQUIT's
default action ends the process with a core dump. So while SGLang launches:

- SIGQUIT is only noted (``custom_sigquit_handler`` on the main thread, ignored off it), so
  the launch itself notices the dead child and raises;
- file descriptor 2 goes to a log file, which the children keep as their stderr, so their
  tracebacks and progress bars stay out of the chat shell; the root cause is read back
  from it for the one-line error.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger("dynamo_run.sglang")

_EXC_LINE = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
# Wrappers that point at the real error rather than say it.
_WRAPPERS = ("Initialization failed", "Rank 0 scheduler", "Please see the error")
_SIG_IGN = 1


def log_path() -> Path:
    """This process's SGLang log file."""
    return Path(tempfile.gettempdir()) / f"dynamo-run-sglang-{os.getpid()}.log"


def on_child_failure(signum: int, frame: FrameType | None) -> None:
    """SIGQUIT from a failed SGLang child: the launch raises on its own; just note it."""
    log.debug("sglang: a child process reported a failure (SIGQUIT)")


@contextlib.contextmanager
def sigquit_ignored_off_main_thread() -> Iterator[None]:
    """Ignore SIGQUIT while SGLang launches from a worker thread, where Python cannot set
    a handler (``signal.signal`` is main-thread only, the C-level disposition is not)."""
    if threading.current_thread() is threading.main_thread():
        yield  # SGLang installs custom_sigquit_handler (on_child_failure) itself
        return
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    previous = libc.signal(signal.SIGQUIT, _SIG_IGN)
    try:
        yield
    finally:
        libc.signal(signal.SIGQUIT, previous)


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 to ``path`` while SGLang starts (its children keep it)."""
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
