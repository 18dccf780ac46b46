"""Tools, JSON schemas and reasoning in ``in=batch`` lines and in the chat shell (a real pty),
plus the new flags' errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import REPO, run_cli

LAST_MESSAGE = str(REPO / "tests" / "templates" / "last_message.jinja")
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}}]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_lines_carry_tools_and_write_calls_and_reasoning(tmp_path: Path) -> None:
    user = [{"role": "user", "content": CALL}]
    inp = _jsonl(
        tmp_path / "in.jsonl",
        [
            {"text": "<think>hm</think>Three."},
            {"messages": user, "tools": TOOLS},
            {
                "custom_id": "c1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": user, "tools": TOOLS},
            },
            {"text": "x", "tools": TOOLS, "tool_choice": "required"},
        ],
    )
    engine = tmp_path / "echo.json"
    engine.write_text('{"delay_ms": 0}')
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        f"in=batch:{inp}", "out=echo", "--extra-engine-args", str(engine), "--output", str(out),
        "--chat-template", LAST_MESSAGE, "--tool-call-parser", "hermes",
        "--reasoning-parser", "qwen3",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the last line fails: out=echo cannot force
    text, chat, openai_form, forced = _records(out)
    assert (text["reasoning"], text["response"], text["finish_reason"]) == ("hm", "Three.", "stop")
    assert chat["finish_reason"] == "tool_calls" and chat["response"] == ""
    (call,) = chat["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    message = openai_form["response"]["body"]["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "add"
    assert "out=echo" in forced["error"]


@pytest.mark.model
def test_batch_forced_call_on_the_default_model(tmp_path: Path) -> None:
    pytest.importorskip("dynamo_run_llamacpp")
    line = {
        "text": "Add 2 and 3.",
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "max_tokens": 40,
    }
    inp = _jsonl(tmp_path / "in.jsonl", [line])
    out = tmp_path / "out.jsonl"
    proc = run_cli(f"in=batch:{inp}", "out=llamacpp", "--output", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr
    (record,) = _records(out)
    assert record["finish_reason"] == "tool_calls", record
    args = json.loads(record["tool_calls"][0]["function"]["arguments"])
    assert set(args) <= {"a", "b"} and all(isinstance(v, int) for v in args.values())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tool-call-parser", "hermez"], "did you mean 'hermes'"),
        (["--reasoning-parser", "qwen"], "did you mean 'qwen3'"),
        (["--chat-template", "/no/such.jinja"], "--chat-template /no/such.jinja: no such file"),
    ],
)
def test_flag_errors_are_one_line(args: list[str], expected: str) -> None:
    proc = run_cli("out=echo", *args, input="hi", timeout=60)
    assert proc.returncode == 2
    assert expected in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_bad_template_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    proc = run_cli("out=echo", "--chat-template", str(bad), input="hi", timeout=60)
    assert proc.returncode == 2
    assert "does not compile" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def _shell(tmp_path: Path) -> pexpect.spawn:
    engine = tmp_path / "echo.json"
    engine.write_text('{"delay_ms": 0}')
    env = {
        **os.environ,
        "DYN_HISTORY_FILE": str(tmp_path / "history"),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
    }
    env.pop("NO_COLOR", None)  # colours on: the reasoning is dimmed
    args = ["-m", "dynamo_run", "in=text", "out=echo", "--extra-engine-args", str(engine)]
    args += ["--chat-template", LAST_MESSAGE, "--reasoning-parser", "qwen3"]
    child = pexpect.spawn(
        sys.executable, args, cwd=str(REPO), env=env, encoding="utf-8",
        dimensions=(40, 200), timeout=60,
    )  # fmt: skip
    child.expect("ready")
    child.expect_exact("Send a message")
    return child


def _ask(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact("Send a message")
    return child.before


def test_shell_shows_reasoning_dimmed_and_set_think_hides_it(tmp_path: Path) -> None:
    child = _shell(tmp_path)
    try:
        assert "/set think on|off" in _ask(child, "/help")
        shown = _ask(child, "<think>pondering</think>The answer.")
        # SGR 2 (dim) around each streamed piece of reasoning: join adjacent dim pieces.
        assert "\x1b[2mpondering" in shown.replace("\x1b[0m\x1b[2m", "")
        assert "The answer." in shown
        assert "Reasoning hidden" in _ask(child, "/set think off")
        hidden = _ask(child, "<think>secret thoughts</think>Visible.")
        answer = hidden.rsplit("\x1b[?2004l", 1)[-1]  # what follows the accepted input line
        assert "Visible." in answer and "secret" not in answer, hidden
        assert "usage: /set think on|off" in _ask(child, "/set think maybe")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
