"""Property-based run of schemathesis against the server's own /openapi.json: no request,
however odd, gets a 5xx, and every response matches what the document says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from http_helpers import Server, echo_server_fixture  # noqa: F401

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    )
)


@pytest.mark.slow
@pytest.mark.skipif(
    not SCHEMATHESIS.exists() and shutil.which("schemathesis") is None,
    reason="schemathesis is not installed (pip install schemathesis)",
)
def test_schemathesis_finds_no_server_errors(echo_server: Server, tmp_path: Path) -> None:
    exe = str(SCHEMATHESIS) if SCHEMATHESIS.exists() else "schemathesis"
    proc = subprocess.run(
        [
            exe, "run", echo_server.root + "/openapi.json",
            "--checks", CHECKS,
            "--max-time", "45",
            "--workers", "1",  # hypothesis' lambda introspection is not thread-safe on 3.11
            "--seed", "20250601",
            "--generation-database", "none",
            "--no-color",
            "--report-dir", str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    assert "Traceback" not in echo_server.log(), echo_server.log()[-4000:]
