"""The pieces the engine adapters share (dynamo_run.engine_support): one-line start errors,
start-up output captured in a log file and its root cause."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dynamo_run.engine_support.errors import load_error, one_line, short, unknown_argument_error
from dynamo_run.engine_support.startup_log import log_path, root_cause, stderr_to


# --- one-line errors ----------------------------------------------------------------------
def test_short_is_the_last_line_and_one_line_is_all_of_it() -> None:
    exc = ValueError("Traceback blah\n\n  the cause  \n")
    assert short(exc) == "the cause"
    assert one_line(ValueError("2 errors\n  a: bad\n  b: worse")) == "2 errors a: bad b: worse"
    assert short(RuntimeError()) == "RuntimeError" and one_line(KeyError()) == "KeyError"
    assert short(ValueError("x" * 500), limit=10) == "xxxxxxx..."
    assert len(one_line(ValueError("y" * 500))) == 400


def test_load_error_names_the_cause_the_log_and_out_of_memory(tmp_path: Path) -> None:
    log_file = tmp_path / "e.log"
    plain = load_error("eng", "/m", ValueError("Unsupported architecture Foo\nmore"))
    assert str(plain) == "eng: cannot load '/m': more"
    caused = load_error("eng", "/m", RuntimeError("see above"), "ValueError: bad", log_file)
    assert str(caused) == f"eng: cannot load '/m': ValueError: bad (log: {log_file})"
    oom = load_error("eng", "/m", RuntimeError("died"), "OutOfMemoryError: CUDA out of memory")
    assert str(oom).startswith("eng: out of GPU memory loading '/m' (OutOfMemoryError")
    assert "--extra-engine-args" in str(oom) and "\n" not in str(oom)


def test_unknown_argument_suggests_close_names() -> None:
    exc = TypeError("__init__() got an unexpected keyword argument 'mem_fraction_statc'")
    err = unknown_argument_error("eng", exc, ["mem_fraction_static", "page_size"])
    assert str(err) == (
        "eng: bad engine argument: __init__() got an unexpected keyword argument "
        "'mem_fraction_statc' (did you mean 'mem_fraction_static'?)"
    )
    assert "did you mean" not in str(unknown_argument_error("eng", TypeError("odd"), ["a"]))


# --- start-up log -------------------------------------------------------------------------
def test_children_write_to_the_log_while_starting(tmp_path: Path) -> None:
    log_file = tmp_path / "engine.log"
    with stderr_to(log_file):
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child says hi')"])
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.stderr.write('after')"], capture_output=True
    )
    assert log_file.read_text() == "child says hi" and proc.stderr == b"after"


def test_stderr_left_alone_when_disabled(tmp_path: Path) -> None:
    log_file = tmp_path / "engine.log"
    with stderr_to(log_file, enabled=False):
        pass
    assert not log_file.exists()


def test_root_cause_skips_wrappers(tmp_path: Path) -> None:
    log_file = tmp_path / "engine.log"
    log_file.write_text(
        "[rank0] torch.OutOfMemoryError: CUDA out of memory.\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Startup failed, see above\n"
    )
    assert root_cause(log_file) == "RuntimeError: Startup failed, see above"
    assert root_cause(log_file, ("Startup failed",)) == "OutOfMemoryError: CUDA out of memory."
    assert root_cause(tmp_path / "missing.log") is None
    assert log_path("eng").name.startswith("dynamo-run-eng-")
