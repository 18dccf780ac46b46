"""Shared test fixtures: the real default model, free loopback ports, the CLI as a process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never download from the Hugging Face hub (no network here, and none wanted).
os.environ["HF_HUB_OFFLINE"] = "1"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_command(*args: str) -> list[str]:
    """argv that runs dynamo-run from this checkout with the current interpreter."""
    return [sys.executable, "-m", "dynamo_run", *args]


def run_cli(*args: str, input: str | None = None, timeout: float = 120, env: dict | None = None):
    """Run dynamo-run to completion; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        cli_command(*args),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from dynamo_run.model.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_card():
    from dynamo_run.model.card import load_model_card

    return load_model_card(None)


@pytest.fixture()
def engine_args(tmp_path: Path):
    """Write an --extra-engine-args JSON file and return its path."""

    def write(**values) -> str:
        path = tmp_path / f"engine-{len(list(tmp_path.glob('engine-*')))}.json"
        path.write_text(json.dumps(values))
        return str(path)

    return write


@pytest.fixture()
def history_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "history"
    yield path
