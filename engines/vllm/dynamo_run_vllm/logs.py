"""Where vLLM's own logging goes: a file, and the terminal only when asked (-v).

vLLM logs to stdout by default, and its engine-core process logs a full traceback when it
fails to start. Both would spoil the chat shell, batch output and the one-line error
dynamo-run promises. So before vLLM is imported, ``VLLM_LOGGING_CONFIG_PATH`` points it at
a logging config (inherited by the engine-core process) that writes everything to a log
file and, at -v, one line per record to stderr. When the engine fails to start, the root
cause is read back from that file and reported in one line with the file's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")
# Wrappers that say "see above" rather than what went wrong.
_WRAPPERS = ("Engine core initialization failed",)


class OneLineFormatter(logging.Formatter):
    """A record as one line: level and message, with only the last line of any exception."""

    def __init__(self) -> None:
        super().__init__("vllm %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info
        record.exc_info, record.exc_text = None, None
        try:
            line = super().format(record).replace("\n", " ")
        finally:
            record.exc_info = exc
        if exc and exc[1] is not None:
            line += f" ({type(exc[1]).__name__}: {exc[1]})"
        return line


def log_path() -> Path:
    """This process's vLLM log file."""
    return Path(tempfile.gettempdir()) / f"dynamo-run-vllm-{os.getpid()}.log"


def configure_vllm_logging(verbosity: int) -> Path:
    """Point vLLM's logging at a fresh log file (and stderr at -v / -vv) before vLLM is
    imported; returns the log file. A user's own VLLM_LOGGING_CONFIG_PATH is kept."""
    log_file = log_path()
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") and not os.environ.get(
        "DYNAMO_RUN_VLLM_LOG_CONFIG"
    ):
        return log_file
    console = {0: "CRITICAL", 1: "INFO"}.get(verbosity, "DEBUG")
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "file": {"format": "%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"},
            "line": {"()": f"{__name__}.OneLineFormatter"},
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_file),
                "formatter": "file",
                "level": "DEBUG" if verbosity >= 2 else "INFO",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "line",
                "level": console,
            },
        },
        "loggers": {
            "vllm": {
                "handlers": ["file", "console"],
                "level": "DEBUG" if verbosity >= 2 else "INFO",
                "propagate": False,
            }
        },
    }
    config_file = log_file.with_suffix(".json")
    config_file.write_text(json.dumps(config))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_file)
    os.environ["DYNAMO_RUN_VLLM_LOG_CONFIG"] = "1"  # ours: replace it on the next start
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    return log_file


@contextlib.contextmanager
def stderr_to(log_file: Path, enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 to ``log_file`` while vLLM starts. Its engine-core process is
    spawned meanwhile and keeps that file as its stderr, so what it prints outside logging
    (import-time warnings, progress bars, C++ warnings, a traceback when it dies) lands in
    the log rather than in the chat shell."""
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


def root_cause(log_file: Path) -> str | None:
    """The last exception line in the log that is not a "see above" wrapper, if any."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = _EXC_LINE.match(line.strip())
        if match and not match.group(2).startswith(_WRAPPERS):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return None


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message squeezed onto one line (pydantic errors span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
