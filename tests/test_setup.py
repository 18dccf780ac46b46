"""The set-up a newcomer runs first (scripts/setup.sh, behind scripts/chat.sh): a few lines
of progress, no warnings or errors, and a working dynamo-run at the end.

It installs into a fresh venv of its own (``DYN_VENV``); pip's cache makes that about a
minute here (llama-cpp-python's wheel was built by the test set-up before this runs)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_setup_prints_a_few_lines_of_progress_and_no_warning(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "DYN_VENV": str(venv)}
    result = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 0, "\n".join(output)
    assert all(line.startswith("setup: ") for line in output), "\n".join(output)
    assert len(output) <= 5, "\n".join(output)
    assert not any(word in line.lower() for line in output for word in ("error", "warning"))
    assert output[-1].startswith("setup: done in")
    version = subprocess.run(
        [str(venv / "bin" / "dynamo-run"), "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0, version.stderr
    # Run again: the stamp makes it a no-op that prints nothing.
    again = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and not (again.stdout + again.stderr).strip()
