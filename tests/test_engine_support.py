"""The pieces the engine adapters share (dynamo_run.engine_support): one-line start errors,
start-up output captured in a log file and its root cause, and KV events re-hashed into
our chained block hashes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dynamo_run.engine_support.errors import load_error, one_line, short, unknown_argument_error
from dynamo_run.engine_support.kv_rehash import KvRehasher
from dynamo_run.engine_support.startup_log import log_path, root_cause, stderr_to
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent


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


# --- KV re-hashing ------------------------------------------------------------------------
def rehasher(block_size: int = 4, **kwargs: object) -> tuple[KvRehasher, list[KvCacheEvent]]:
    got: list[KvCacheEvent] = []
    r = KvRehasher(block_size, **kwargs)  # type: ignore[arg-type]
    r.set_sink(got.append)
    return r, got


def test_stored_blocks_are_chained_across_events_and_removed() -> None:
    r, got = rehasher()
    tokens = list(range(100, 112))
    r.stored(None, [("a", tokens[:4]), ("b", tokens[4:8])])
    r.stored("b", [("c", tokens[8:12])])
    ours = block_hashes(tokens, 4)
    assert [(e.kind, e.block_hashes, e.parent_hash, e.block_size) for e in got] == [
        (KV_STORED, ours[:2], None, 4),
        (KV_STORED, ours[2:], ours[1], 4),
    ]
    r.removed(["c", "unknown"])
    assert (got[-1].kind, got[-1].block_hashes) == (KV_REMOVED, ours[2:])
    assert r.held == 2
    r.clear()
    assert got[-1].kind == KV_CLEARED and r.held == 0


def test_engine_blocks_spanning_several_of_ours() -> None:
    r, got = rehasher(block_size=4)
    tokens = list(range(16))
    r.stored(None, [([1, 2], tokens[:8]), ([3, 4], tokens[8:16])], tokens_per_block=8)
    ours = block_hashes(tokens, 4)
    assert got[0].block_hashes == ours and got[0].parent_hash is None
    r.removed([[1, 2], [3, 4]])  # list hashes (msgpack) are keys too
    assert got[-1].block_hashes == [ours[1], ours[0], ours[3], ours[2]]  # children first


def test_partial_and_orphan_blocks_are_not_reported() -> None:
    r, got = rehasher()
    r.stored(None, [(1, [1, 2, 3, 4]), (2, [5, 6]), (3, [7, 8, 9, 10])])
    assert got[-1].block_hashes == block_hashes([1, 2, 3, 4], 4) and r.held == 1
    r.stored(12345, [(9, [1, 2, 3, 4])])
    assert len(got) == 1 and r.skipped == 1


def test_same_tokens_under_two_engine_hashes_are_one_of_ours() -> None:
    r, got = rehasher()
    r.stored(None, [(1, [1, 2, 3, 4])])
    r.stored(None, [(2, [1, 2, 3, 4]), (3, [5, 6, 7, 8])])  # a cache salt, say
    ours = block_hashes(list(range(1, 9)), 4)
    assert [(e.block_hashes, e.parent_hash) for e in got] == [
        ([ours[0]], None),
        ([ours[1]], ours[0]),
    ]
    r.removed([1])
    assert len(got) == 2  # still held through engine block 2
    r.removed([2])
    assert got[-1].kind == KV_REMOVED and got[-1].block_hashes == [ours[0]]


def test_repeated_hash_is_ignored_or_counted() -> None:
    """SGLang / TensorRT-LLM: a repeat is ignored; vLLM (count_repeats): it is another
    holder that needs its own removal."""
    for count_repeats, removals in ((False, 1), (True, 2)):
        r, got = rehasher(count_repeats=count_repeats)
        r.stored(None, [(1, [1, 2, 3, 4])])
        r.stored(None, [(1, [1, 2, 3, 4]), (2, [5, 6, 7, 8])])
        ours = block_hashes(list(range(1, 9)), 4)
        assert got[-1].block_hashes == [ours[1]] and got[-1].parent_hash == ours[0]
        for _ in range(removals - 1):
            r.removed([1])
            assert r.held == 2 and got[-1].kind == KV_STORED
        r.removed([1])
        assert r.held == 1 and (got[-1].kind, got[-1].block_hashes) == (KV_REMOVED, [ours[0]])


def test_new_sink_hears_what_is_held_and_old_hears_cleared() -> None:
    r = KvRehasher(4)
    r.stored(None, [(1, list(range(4))), (2, list(range(4, 8)))])
    first: list[KvCacheEvent] = []
    r.set_sink(first.append)
    ours = block_hashes(list(range(8)), 4)
    assert [(e.block_hashes, e.parent_hash) for e in first] == [
        ([ours[0]], None),
        ([ours[1]], ours[0]),
    ]
    second: list[KvCacheEvent] = []
    sink = second.append
    r.set_sink(sink)
    assert first[-1].kind == KV_CLEARED and len(second) == 2
    r.set_sink(sink)  # the same sink again: nothing repeated
    assert len(second) == 2


def test_a_failing_sink_does_not_stop_the_events() -> None:
    def broken(event: KvCacheEvent) -> None:
        raise RuntimeError("listener gone")

    r = KvRehasher(4)
    r.set_sink(broken)
    r.stored(None, [(1, [1, 2, 3, 4])])
    r.removed([1])
    assert r.held == 0 and r.events == 2


def test_core_imports_nothing_heavy() -> None:
    code = (
        "import sys, dynamo_run.engine_support.errors, dynamo_run.engine_support.startup_log,"
        " dynamo_run.engine_support.kv_rehash\n"
        "print(sorted(m for m in ('torch', 'vllm', 'zmq', 'sglang', 'tensorrt_llm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
