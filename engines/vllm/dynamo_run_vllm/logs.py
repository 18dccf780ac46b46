"""Where vLLM's own logging goes: a file, and the terminal only when asked (-v).

vLLM logs to stdout by default, and its engine-core process logs a full traceback when it
fails to start. Both would spoil the chat shell, batch output and the one-line error
dynamo-run promises. So before vLLM is imported, ``VLLM_LOGGING_CONFIG_PATH`` points it at
a logging config (inherited by the engine-core process) that writes everything to a log
file and, at -v, one line per record to stderr. When the engine fails to start, the root
cause is read back from that file and reported in one line with the file's path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from dynamo_run.engine_support.startup_log import log_path

# vLLM's exception lines start the line (its logging prefixes nothing to them).
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")
# Wrappers that say "see above" rather than what went wrong.
LOG_WRAPPERS = ("Engine core initialization failed",)


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


def configure_vllm_logging(verbosity: int) -> Path:
    """Point vLLM's logging at a fresh log file (and stderr at -v / -vv) before vLLM is
    imported; returns the log file. A user's own VLLM_LOGGING_CONFIG_PATH is kept."""
    log_file = log_path("vllm")
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
