"""Keep the terminal's Ctrl-C away from vLLM's engine-core process.

In the chat shell Ctrl-C stops the answer being written. The terminal sends SIGINT to its
whole foreground process group, and vLLM's engine core shuts down on SIGINT, so the next
question would find the engine dead. vLLM starts the engine core with multiprocessing's
``spawn`` (a fresh interpreter: a blocked signal mask does not survive it), so while vLLM
starts, the spawn command is given a first statement that moves the new process into a
process group of its own (its own children, vLLM's workers, follow it). Out of the
terminal's group it no longer gets the hang-up either, so it also watches its parent and
stops (SIGTERM: vLLM's own graceful shutdown, which stops its workers) when dynamo-run is
gone, however it went; ``close()`` shuts vLLM down the ordinary way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence

_LOCK = threading.Lock()
_PREFIX = "from dynamo_run_vllm.detach import child_setup; child_setup(); "


def child_setup(poll_s: float = 1.0) -> None:
    """In the spawned process, first thing: its own process group, and a thread that sends
    it SIGTERM once its parent has exited (it is then adopted by another process)."""
    os.setpgid(0, 0)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


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
