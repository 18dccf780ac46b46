"""``dynamo-run in=batch:FILE`` end to end, as a real process with the echo engine.

Echo returns the rendered prompt's tokens, so outputs are exact. Covers the three line
forms, error lines in place, ordering, resume after kill -9 / a torn last line / Ctrl-C,
refusing to resume a different input, exit codes and the summary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, cli_command, run_cli

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def echoed(user: str, system: str = SYSTEM) -> str:
    """What echo answers to a one-message chat with SmolLM2's template."""
    return f"system\n{system}\nuser\n{user}\nassistant\n"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def openai_line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions"):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


class Summary:
    """The numbers of the summary printed on stderr."""

    def __init__(self, stderr: str) -> None:
        head = re.search(r"batch: (\d+) of (\d+) lines: (\d+) ok, (\d+) failed", stderr)
        run = re.search(
            r"this run: (\d+) lines in ([\d.]+) s, [\d.]+ requests/s; "
            r"tokens in (\d+), out (\d+), [\d.]+ tokens/s out",
            stderr,
        )
        assert head and run, stderr
        self.lines, self.total, self.ok, self.failed = map(int, head.groups())
        self.run_lines = int(run.group(1))
        self.seconds = float(run.group(2))
        self.tokens_in, self.tokens_out = int(run.group(3)), int(run.group(4))


def batch(inp: Path, *args: str, delay_ms: float = 0, timeout: float = 120):
    extra = inp.parent / f"echo-{delay_ms}.json"
    extra.write_text(json.dumps({"delay_ms": delay_ms}))
    return run_cli(
        f"in=batch:{inp}", "out=echo", "--extra-engine-args", str(extra), *args, timeout=timeout
    )


def start_batch(inp: Path, *args: str, delay_ms: float) -> subprocess.Popen[str]:
    extra = inp.parent / f"echo-{delay_ms}.json"
    extra.write_text(json.dumps({"delay_ms": delay_ms}))
    argv = cli_command(f"in=batch:{inp}", "out=echo", "--extra-engine-args", str(extra), *args)
    return subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen[str], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {count} lines")


# --- the three forms -------------------------------------------------------------------------


def test_text_chat_and_openai_forms_give_exact_outputs(tmp_path: Path) -> None:
    inp = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"text": "Hi"},
            {"text": "Count", "max_tokens": 3, "temperature": 0.5, "seed": 1},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Yo"},
                ]
            },
            openai_line("chat-1", chat_body("hey", n=2)),
            openai_line("cmpl-1", {"prompt": "Hello world", "echo": True}, "/v1/completions"),
            openai_line(
                "cmpl-2", {"prompt": ["Hello world", "Bye"], "max_tokens": 1}, "/v1/completions"
            ),
        ],
    )
    result = batch(inp)
    assert result.returncode == 0, result.stderr
    out = records(tmp_path / "output.jsonl")  # Dynamo's default: output.jsonl beside the input
    assert len(out) == 6

    assert out[0] == {
        "line": 1,
        "text": "Hi",
        "response": echoed("Hi"),
        "tokens_in": 31,
        "tokens_out": 31,
        "elapsed_ms": out[0]["elapsed_ms"],
        "finish_reason": "stop",
        "error": None,
    }
    assert out[1]["response"] == "system\n" and out[1]["tokens_out"] == 3  # <|im_start|> is hidden
    assert out[1]["finish_reason"] == "length"
    assert out[2]["line"] == 3 and out[2]["text"] == "Yo"
    assert out[2]["response"] == echoed("Yo", system="Be brief.")

    chat = out[3]
    assert set(chat) == {"id", "custom_id", "response", "error"}
    assert chat["id"].startswith("batch_req_") and chat["custom_id"] == "chat-1"
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "SmolLM2-135M-Instruct"
    assert [c["message"]["content"] for c in body["choices"]] == [echoed("hey")] * 2
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 31 and body["usage"]["completion_tokens"] == 62

    cmpl = out[4]["response"]["body"]
    assert cmpl["object"] == "text_completion"
    assert cmpl["choices"][0]["text"] == "Hello worldHello world"  # echo=true prepends
    cmpl2 = out[5]["response"]["body"]
    assert [c["text"] for c in cmpl2["choices"]] == ["Hello", "By"]
    assert cmpl2["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    summary = Summary(result.stderr)
    assert (summary.lines, summary.ok, summary.failed) == (6, 6, 0)


def test_embeddings_need_an_engine_that_embeds(tmp_path: Path) -> None:
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [
            openai_line("e1", {"input": "hello"}, "/v1/embeddings"),
            openai_line("c1", chat_body("x")),
        ],
    )
    result = batch(inp)
    assert result.returncode == 1
    emb, chat = records(tmp_path / "output.jsonl")
    assert emb["custom_id"] == "e1" and emb["response"] is None
    assert emb["error"]["code"] == "not_supported" and "embeddings" in emb["error"]["message"]
    assert chat["error"] is None


def test_request_template_defaults_apply_under_line_fields(tmp_path: Path) -> None:
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"max_tokens": 2, "temperature": 0.1}))
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hi"}, {"text": "Hi", "max_tokens": 4}])
    result = batch(inp, "--request-template", str(template))
    assert result.returncode == 0, result.stderr
    first, second = records(tmp_path / "output.jsonl")
    assert (first["tokens_out"], first["finish_reason"]) == (2, "length")
    assert (second["tokens_out"], second["response"]) == (4, "system\nYou")


# --- errors stay in place ----------------------------------------------------------------------


def test_malformed_lines_become_error_lines_in_place(tmp_path: Path) -> None:
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"text": "Hi"},
            "{not json",
            "",  # blank lines are skipped, as Dynamo and vLLM do
            {"text": "Hi", "max_tokens": 2, "colour": "red", "temprature": 1},
            [1, 2],
            {"prompt": "no form"},
            {"text": 42},
            {"text": "Hi", "temperature": 9},
            {"messages": []},
            {"text": "Yo", "stream": True},
            {"text": "last"},
        ],
    )
    result = batch(inp, "--output", str(tmp_path / "res.jsonl"))
    assert result.returncode == 1
    out = records(tmp_path / "res.jsonl")
    assert [r["line"] for r in out] == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    errors = [r["error"] for r in out]
    assert errors[0] is None and errors[-1] is None
    assert out[-1]["response"] == echoed("last")
    assert errors[1].startswith("invalid JSON")
    assert "unknown fields 'colour', 'temprature' (did you mean 'temperature'?)" in errors[2]
    assert out[2]["text"] == "Hi" and out[2]["response"] is None
    assert "expected a JSON object" in errors[3] and "expected a JSON object" in errors[4]
    assert errors[5] == "text: must be a string"
    assert errors[6].startswith("temperature: ")
    assert errors[7].startswith("messages: ")
    assert "unknown field 'stream'" in errors[8]
    summary = Summary(result.stderr)
    assert (summary.lines, summary.ok, summary.failed) == (10, 2, 8)
    assert f"8 failed lines carry their error in {tmp_path / 'res.jsonl'}" in result.stderr


def test_openai_form_errors_and_duplicate_ids(tmp_path: Path) -> None:
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [
            openai_line("a", chat_body("one")),
            openai_line("b", {"prompt": "x"}, "/v1/images/generations"),
            {"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}},
            {"method": "POST", "url": "/v1/chat/completions", "body": chat_body("x")},
            openai_line("d", {"messages": "nope"}),
            openai_line("e", chat_body("x", stream=True)),
            openai_line("a", chat_body("again")),
            {**openai_line("f", chat_body("x")), "extra": 1},
            "{broken",
            openai_line("g", chat_body("fine")),
        ],
    )
    result = batch(inp)
    assert result.returncode == 1
    out = records(tmp_path / "output.jsonl")
    assert [r["custom_id"] for r in out] == ["a", "b", "c", None, "d", "e", "a", "f", None, "g"]
    codes = [r["error"] and r["error"]["code"] for r in out]
    assert codes == [
        None,
        "invalid_url",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "duplicate_custom_id",
        "invalid_request",
        "invalid_json",  # a bad line in an OpenAI file gets an OpenAI-shaped error line
        None,
    ]
    for r in out:
        assert set(r) == {"id", "custom_id", "response", "error"}
        assert (r["response"] is None) == (r["error"] is not None)
    assert "method: must be 'POST'" in out[2]["error"]["message"]
    assert out[3]["error"]["message"].startswith("custom_id: required")
    assert out[4]["error"]["message"].startswith("body.messages")
    assert "stream" in out[5]["error"]["message"]
    assert "'extra'" in out[7]["error"]["message"]


def test_prompt_over_the_context_is_an_error_line(tmp_path: Path) -> None:
    long_text = " ".join(["word"] * 80)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": long_text}, {"text": "Hi"}])
    result = batch(inp, "--context-length", "64")
    assert result.returncode == 1
    over, fine = records(tmp_path / "output.jsonl")
    assert "maximum context length is 64 tokens" in over["error"]
    assert fine["error"] is None and fine["response"] == echoed("Hi")


# --- resume --------------------------------------------------------------------------------------


def test_resume_after_kill_9_finishes_without_duplicates(tmp_path: Path) -> None:
    rows = [openai_line(f"req-{i}", chat_body(f"prompt {i}")) for i in range(30)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out_path = tmp_path / "out.jsonl"
    proc = start_batch(inp, "--output", str(out_path), "--batch-concurrency", "2", delay_ms=15)
    try:
        wait_for_lines(out_path, 4, proc)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.communicate()
    partial = out_path.read_bytes().count(b"\n")
    assert 4 <= partial < 30

    result = batch(inp, "--output", str(out_path), "--batch-concurrency", "8")
    assert result.returncode == 0, result.stderr
    assert f"resuming: {partial} of 30 lines" in result.stderr
    out = records(out_path)
    ids = [r["custom_id"] for r in out]
    assert ids == [f"req-{i}" for i in range(30)]  # all present, in order, no duplicates
    for i, r in enumerate(out):
        assert r["response"]["body"]["choices"][0]["message"]["content"] == echoed(f"prompt {i}")
    summary = Summary(result.stderr)
    assert (summary.lines, summary.ok, summary.run_lines) == (30, 30, 30 - partial)


def test_torn_last_line_is_dropped_and_redone(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": f"q{i}"} for i in range(10)])
    out_path = tmp_path / "output.jsonl"
    assert batch(inp).returncode == 0
    data = out_path.read_bytes()
    lines = data.splitlines(keepends=True)
    torn = b"".join(lines[:3]) + lines[3][:25]  # kill -9 in the middle of writing line 4
    out_path.write_bytes(torn)

    result = batch(inp)
    assert result.returncode == 0, result.stderr
    assert "dropped an incomplete last line" in result.stderr
    out = records(out_path)
    assert [r["line"] for r in out] == list(range(1, 11))
    assert [r["response"] for r in out] == [echoed(f"q{i}") for i in range(10)]
    summary = Summary(result.stderr)
    assert summary.run_lines == 7 and "(3 done in an earlier run)" in result.stderr


def test_ctrl_c_keeps_finished_lines_and_exits_130(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": f"q{i}"} for i in range(40)])
    out_path = tmp_path / "output.jsonl"
    proc = start_batch(inp, "--batch-concurrency", "2", delay_ms=15)
    try:
        wait_for_lines(out_path, 3, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted; rerun the same command" in stderr
    kept = records(out_path)
    assert 3 <= len(kept) < 40
    assert [r["line"] for r in kept] == list(range(1, len(kept) + 1))
    assert Summary(stderr).lines == len(kept)

    result = batch(inp)
    assert result.returncode == 0, result.stderr
    assert [r["line"] for r in records(out_path)] == list(range(1, 41))


def test_rerun_of_a_finished_batch_does_nothing(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, "oops", {"text": "b"}])
    assert batch(inp).returncode == 1
    before = (tmp_path / "output.jsonl").read_bytes()
    result = batch(inp)
    assert result.returncode == 1  # the file still holds a failed line
    assert (tmp_path / "output.jsonl").read_bytes() == before
    summary = Summary(result.stderr)
    assert (summary.lines, summary.ok, summary.failed, summary.run_lines) == (3, 2, 1, 0)


def test_a_changed_input_is_not_resumed_and_overwrite_starts_afresh(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    assert batch(inp).returncode == 0
    write_jsonl(inp, [{"text": "a"}, {"text": "c"}])
    result = batch(inp)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--overwrite" in result.stderr
    assert "different input" in result.stderr

    result = batch(inp, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert [r["text"] for r in records(tmp_path / "output.jsonl")] == ["a", "c"]


def test_an_output_not_written_by_a_batch_is_not_touched(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    foreign = tmp_path / "output.jsonl"
    foreign.write_text('{"mine": true}\n')
    result = batch(inp)
    assert result.returncode == 2
    assert "has no batch state" in result.stderr
    assert foreign.read_text() == '{"mine": true}\n'


def test_resume_with_another_engine_is_refused(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    assert batch(inp).returncode == 0
    state_path = tmp_path / "output.jsonl.state"
    state = json.loads(state_path.read_text())
    assert state["out"] == "echo" and state["input_bytes"] == inp.stat().st_size
    state_path.write_text(json.dumps({**state, "out": "llamacpp"}))
    result = batch(inp)
    assert result.returncode == 2 and "written by out=llamacpp" in result.stderr


# --- exit codes, summary, progress ------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jsonl", "no such file"),
        (lambda d: d, "not a file"),
    ],
)
def test_unusable_input_exits_2_with_one_line(tmp_path: Path, make, message: str) -> None:
    result = batch_path(make(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("dynamo-run: error: in=batch:")
    assert message in result.stderr and result.stderr.count("\n") == 1


def batch_path(path: Path):
    return run_cli(f"in=batch:{path}", "out=echo", timeout=60)


def test_unusable_output_exits_2(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    result = batch(inp, "--output", str(tmp_path / "nowhere" / "out.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = batch(inp, "--output", str(inp))
    assert result.returncode == 2 and "is the input file itself" in result.stderr
    assert inp.read_text() == '{"text": "a"}\n'


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read any file")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    inp.chmod(0)
    result = batch(inp)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_empty_input_exits_0_with_an_empty_summary(tmp_path: Path) -> None:
    inp = tmp_path / "empty.jsonl"
    inp.write_text("\n\n")
    result = batch(inp)
    assert result.returncode == 0, result.stderr
    summary = Summary(result.stderr)
    assert (summary.lines, summary.total, summary.ok, summary.failed) == (0, 0, 0, 0)
    assert (tmp_path / "output.jsonl").read_text() == ""


def test_summary_agrees_with_the_output_file(tmp_path: Path) -> None:
    rows: list[Any] = [{"text": "x" * (i + 1), "max_tokens": 5 + i} for i in range(12)]
    rows[4] = "bad"
    rows[7] = openai_line("o", chat_body("hello"))
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    result = batch(inp)
    assert result.returncode == 1
    out = records(tmp_path / "output.jsonl")
    ok = [r for r in out if r["error"] is None]
    tokens_in = sum(r.get("tokens_in", 0) for r in ok)
    tokens_out = sum(r.get("tokens_out", 0) for r in ok)
    usage = out[7]["response"]["body"]["usage"]
    tokens_in += usage["prompt_tokens"]
    tokens_out += usage["completion_tokens"]
    summary = Summary(result.stderr)
    assert (summary.lines, summary.ok, summary.failed) == (12, len(ok), 1)
    assert (summary.tokens_in, summary.tokens_out) == (tokens_in, tokens_out)


def test_requests_run_concurrently(tmp_path: Path) -> None:
    delay_ms = 10
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": f"question {i}"} for i in range(16)])
    result = batch(inp, "--batch-concurrency", "8", delay_ms=delay_ms)
    assert result.returncode == 0, result.stderr
    summary = Summary(result.stderr)
    sequential = summary.tokens_out * delay_ms / 1000  # one request after another
    assert summary.seconds < sequential / 2, (summary.seconds, sequential)
    elapsed = [r["elapsed_ms"] for r in records(tmp_path / "output.jsonl")]
    assert min(elapsed) >= 30 * delay_ms * 0.9  # each request still took its own time


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": f"q{i}"} for i in range(5)])
    result = batch(inp)
    assert "batch: 5 of 5 lines to run" in result.stderr
    assert "batch: 5/5 lines (100%)" in result.stderr
    assert "\x1b[" not in result.stderr  # no terminal control codes in logs


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": f"q{i}"} for i in range(12)])
    extra = tmp_path / "slow.json"
    extra.write_text(json.dumps({"delay_ms": 10}))
    argv = cli_command(f"in=batch:{inp}", "out=echo", "--extra-engine-args", str(extra))
    child = pexpect.spawn(
        argv[0], argv[1:], cwd=str(REPO), encoding="utf-8", timeout=60, dimensions=(24, 120)
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "lines/s" in child.before and "━" in child.before  # rich's bar
    assert "batch: 12 of 12 lines: 12 ok, 0 failed" in child.before


def test_out_of_order_completions_are_written_in_input_order(tmp_path: Path) -> None:
    rows = [{"text": "long " * 60}] + [{"text": f"s{i}", "max_tokens": 2} for i in range(10)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    result = batch(inp, "--batch-concurrency", "4", delay_ms=5)
    assert result.returncode == 0, result.stderr
    out = records(tmp_path / "output.jsonl")
    assert [r["line"] for r in out] == list(range(1, 12))
    # the first line took longer than all the short ones together: they finished first
    assert out[0]["elapsed_ms"] > sum(r["elapsed_ms"] for r in out[1:4])
    assert out[0]["response"] == echoed("long " * 60)
