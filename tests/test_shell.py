"""The chat shell in a real pseudo-terminal (pexpect), and the piped single-shot mode."""

from __future__ import annotations

import json
import os
import re
import sys

import pexpect
import pytest
from conftest import REPO, run_cli

PROMPT = ">>> "
# Shown only in a fresh, empty prompt: marks that the shell is waiting for input again.
READY = "Send a message"


def spawn_shell(tmp_path, *args: str, delay_ms: float = 0) -> pexpect.spawn:
    engine_args = tmp_path / "echo.json"
    engine_args.write_text(json.dumps({"delay_ms": delay_ms}))
    env = {
        **os.environ,
        "DYN_HISTORY_FILE": str(tmp_path / "history"),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
        "NO_COLOR": "1",
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dynamo_run", "in=text", "out=echo", "--extra-engine-args", str(engine_args), *args],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        dimensions=(40, 200),
        timeout=60,
    )
    child.expect("ready")
    child.expect_exact(READY)
    return child


def ask(child: pexpect.spawn, text: str) -> str:
    """Type a line, wait for the next prompt, return what was printed in between."""
    child.sendline(text)
    child.expect_exact(READY)
    return child.before


def test_two_turn_chat_keeps_history_and_exits_on_ctrl_d(tmp_path):
    child = spawn_shell(tmp_path)
    try:
        first = ask(child, "My name is Ada")
        # The echo engine answers with the rendered conversation: template + question.
        assert "user\r\nMy name is Ada\r\nassistant" in first
        second = ask(child, "What is my name?")
        # The second prompt contains the first turn: history is kept across turns.
        assert second.count("My name is Ada") >= 1
        assert "What is my name?" in second
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "history").read_text()
    assert "My name is Ada" in history and "What is my name?" in history


def test_slash_commands(tmp_path):
    child = spawn_shell(tmp_path)
    try:
        assert "Set temperature to 0.2" in ask(child, "/set temperature 0.2")
        assert "temperature" in ask(child, "/set")
        assert "less than or equal to 2" in ask(child, "/set temperature 9")
        assert "did you mean 'top_k'" in ask(child, "/set topk 5")
        shown = ask(child, "/show")
        assert "SmolLM2-135M-Instruct" in shown and "'temperature': 0.2" in shown
        # The defaults a setting left unset gets, and where each comes from.
        assert re.search(r"top_k\s+40\s+llama\.cpp default", shown), shown
        assert "System prompt set" in ask(child, "/system You are terse.")
        answer = ask(child, "hi")
        assert "system\r\nYou are terse." in answer
        assert "Stats on" in ask(child, "/stats on")
        assert "tokens/s" in ask(child, "again")
        saved = tmp_path / "conv.json"
        assert "Saved 4 messages" in ask(child, f"/save {saved}")
        assert json.loads(saved.read_text())["system"] == "You are terse."
        assert "Conversation cleared" in ask(child, "/clear")
        assert "Loaded 4 messages" in ask(child, f"/load {saved}")
        assert "no such file" in ask(child, f"/load {tmp_path / 'missing.json'}")
        assert "did you mean /help" in ask(child, "/hepl")
        assert "/system" in ask(child, "/help")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_tab_completes_commands(tmp_path):
    child = spawn_shell(tmp_path)
    try:
        child.send("/sh\t")
        child.expect_exact("/show")
        child.send("\r")
        child.expect("context_length")
        child.expect_exact(READY)
    finally:
        child.close()


def test_ctrl_c_stops_the_answer_then_ctrl_c_on_empty_prompt_exits(tmp_path):
    child = spawn_shell(tmp_path, delay_ms=50)
    try:
        child.sendline("count " * 200)
        child.expect("assistant")  # the answer is streaming (echo is slow: 50 ms a token)
        child.sendcontrol("c")
        child.expect("answer stopped")
        child.expect_exact(READY)
        # The shell is still usable after the interruption.
        child.sendline("/clear")
        child.expect("Conversation cleared")
        child.expect_exact(READY)
        child.sendcontrol("c")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_multiline_block(tmp_path):
    child = spawn_shell(tmp_path)
    try:
        child.sendline('"""first line')
        child.sendline("second line")
        child.sendline('third"""')
        child.expect_exact(READY)
        assert "user\r\nfirst line\r\nsecond line\r\nthird\r\nassistant" in child.before
    finally:
        child.close()


def test_piped_stdin_prints_only_the_answer(engine_args):
    result = run_cli(
        "out=echo", "--extra-engine-args", engine_args(delay_ms=0), input="What is 2+2?\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n"
        "user\nWhat is 2+2?\nassistant\n"
    )


def test_prompt_flag_with_piped_context(engine_args):
    result = run_cli(
        "out=echo",
        "--extra-engine-args",
        engine_args(delay_ms=0),
        "-p",
        "Summarise:",
        input="a document",
    )
    assert result.returncode == 0
    assert "user\nSummarise:\n\na document\nassistant" in result.stdout


def test_empty_stdin_is_an_error(engine_args):
    result = run_cli("out=echo", "--extra-engine-args", engine_args(delay_ms=0), input="")
    assert result.returncode == 2
    assert "no question on standard input" in result.stderr


@pytest.mark.model
def test_real_model_in_the_shell(tmp_path):
    env = {**os.environ, "DYN_HISTORY_FILE": str(tmp_path / "h"), "PROMPT_TOOLKIT_NO_CPR": "1"}
    template = tmp_path / "greedy.json"
    template.write_text(json.dumps({"temperature": 0, "max_tokens": 40}))
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dynamo_run", "in=text", "out=llamacpp", "--request-template", str(template)],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        dimensions=(40, 200),
        timeout=180,
    )
    try:
        child.expect("ready")
        child.expect_exact(READY)
        # Greedy SmolLM2 answers these two correctly (checked against llama.cpp itself).
        answer = ask(child, "Name the capital of France.")
        assert "Paris" in answer
        follow_up = ask(child, "What is 2 plus 2?")
        assert "4" in follow_up
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_looping_answer_is_stopped_long_before_the_context_is_full(tmp_path):
    # The echo engine repeats the prompt, so a question that is one phrase over and over
    # makes an answer that loops exactly as a small model's sometimes does.
    loop = "la Femme, " * 300
    child = spawn_shell(tmp_path)
    try:
        shown = ask(child, loop)
        assert "answer stopped: it was repeating itself" in shown
        # The answer (after the echoed template's user turn, past the typed line) stopped
        # after a few dozen tokens of repetition, not 300 repeats.
        answer = shown.split("user\r\n", 1)[1]
        assert answer.count("la Femme") < 40, answer
        # The shell still answers afterwards, and the stopped answer stayed in the history.
        assert "hello again" in ask(child, "hello again")
    finally:
        child.close()


def test_single_shot_stops_a_looping_answer(tmp_path):
    engine_args = tmp_path / "echo.json"
    engine_args.write_text(json.dumps({"delay_ms": 0}))
    loop = "la Femme, " * 300
    result = run_cli("in=text", "out=echo", "--extra-engine-args", str(engine_args), input=loop)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("la Femme") < 40
    assert "answer stopped: it was repeating itself" in result.stderr
