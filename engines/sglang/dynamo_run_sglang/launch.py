"""Starting SGLang so that a failure is one line, not a dead process or a traceback.

SGLang's scheduler and detokenizer are child processes. When one fails while loading (out
of GPU memory, an unsupported model) it logs a traceback to stderr and sends SIGQUIT to
the parent, whose launch-time handler kills the whole process tree; off the main thread
(dynamo-run loads engines in a worker thread) no handler is installed and SIGQUIT's
default action ends the process with a core dump. So while SGLang launches:

- SIGQUIT is only noted (``custom_sigquit_handler`` on the main thread, ignored off it), so
  the launch itself notices the dead child and raises;
- file descriptor 2 goes to a log file (dynamo_run.engine_support.startup_log), which the
  children keep as their stderr, so their tracebacks and progress bars stay out of the
  chat shell; the root cause is read back from it for the one-line error, skipping
  ``LOG_WRAPPERS``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("dynamo_run.sglang")

# SGLang's messages that point at the real error in its log rather than say it.
LOG_WRAPPERS = ("Initialization failed", "Rank 0 scheduler", "Please see the error")
_SIG_IGN = 1


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
