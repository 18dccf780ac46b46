"""Keep the terminal's Ctrl-C away from vLLM's engine-core process.

In the chat shell Ctrl-C stops the answer being written. The terminal sends SIGINT to its
whole foreground process group, and vLLM's engine core shuts down on SIGINT, so the next
question would find the engine dead. vLLM starts the engine core with multiprocessing's
``spawn`` (a fresh interpreter: a blocked signal mask does not survive it), so while vLLM
starts, the spawn command is given a first statement that moves the new process into a
process group of its own (its own children, vLLM's workers, follow it). dynamo-run still
stops it: ``close()`` shuts vLLM down, and the engine core exits when its parent dies.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

_LOCK = threading.Lock()
_PREFIX = "import os; os.setpgid(0, 0); "


@contextlib.contextmanager
def own_process_group() -> Iterator[None]:
    """Processes spawned meanwhile (multiprocessing ``spawn``) start in their own group."""
    from multiprocessing import util

    with _LOCK:
        original = util.spawnv_passfds

        def spawn_detached(path: str, args: Sequence[str], passfds: Sequence[int]) -> int:
            argv = list(args)
            if "-c" in argv[:-1]:
                code = argv.index("-c") + 1
                argv[code] = _PREFIX + argv[code]
            return original(path, argv, passfds)

        util.spawnv_passfds = spawn_detached
        try:
            yield
        finally:
            util.spawnv_passfds = original
