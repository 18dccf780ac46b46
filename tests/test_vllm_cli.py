"""``out=vllm`` end to end, as real processes with vLLM's CPU build and the default model as
an HF folder: the OpenAI server answering the official ``openai`` client, the chat shell
in a pseudo-terminal, ``in=batch``, a worker behind ``out=dyn`` over a real nats-server,
and the one-line errors."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pexpect
import pytest
from conftest import REPO, run_cli
from dist_helpers import NatsServer, Worker, frontend, start_nats, start_procs, wait_models
from http_helpers import Server, metric
from vllm_helpers import CONTEXT, VLLM_ENV, hf_folder, needs_vllm

__all__ = ["hf_folder"]  # the fixture, imported for pytest

pytestmark = [needs_vllm, pytest.mark.slow, pytest.mark.timeout(900)]

START_S = 600  # vLLM starts in ~30 s idle; much longer while other tests load the CPUs
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
FLAGS = ["--context-length", str(CONTEXT)]


# --- in=http out=vllm and the openai client ---------------------------------------------------


@pytest.fixture(scope="module")
def server(hf_folder: Path) -> Iterator[Server]:
    srv = Server(out="vllm", args=[str(hf_folder), *FLAGS], env=VLLM_ENV)
    try:
        srv.wait_ready(timeout=START_S)
        yield srv
        assert srv.stop() == 0, srv.log()
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=model_name(client), messages=CAPITAL, temperature=0, max_tokens=30
    )
    assert "Paris" in res.choices[0].message.content
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.prompt_tokens > 10 and res.usage.completion_tokens > 3


def test_stream_with_usage_matches_whole(client: openai.OpenAI) -> None:
    name = model_name(client)
    whole = client.chat.completions.create(
        model=name, messages=CAPITAL, temperature=0, max_tokens=30
    )
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=CAPITAL,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_string_cuts_the_answer(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=model_name(client), messages=CAPITAL, temperature=0, max_tokens=30, stop=["Paris"]
    )
    content = res.choices[0].message.content
    assert "Paris" not in content and content.strip()
    assert res.choices[0].finish_reason == "stop"


def test_n_and_seed(client: openai.OpenAI) -> None:
    name = model_name(client)
    story = [{"role": "user", "content": "Tell me a story about a dragon."}]
    kw = {"model": name, "messages": story, "temperature": 1.0, "max_tokens": 16}
    first = client.chat.completions.create(**kw, seed=11)
    again = client.chat.completions.create(**kw, seed=11)
    assert first.choices[0].message.content == again.choices[0].message.content
    several = client.chat.completions.create(**kw, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert len({c.message.content for c in several.choices}) > 1
    assert several.usage.completion_tokens >= 3


def test_json_object(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=model_name(client),
        messages=[{"role": "user", "content": "Give a JSON object with a name."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    content = res.choices[0].message.content
    assert content.lstrip().startswith("{"), content
    if res.choices[0].finish_reason == "stop":  # not cut by max_tokens: a whole object
        assert isinstance(json.loads(content), dict)


def test_hang_up_frees_the_request_in_vllm(server: Server) -> None:
    """A client that goes away mid-stream: vLLM aborts the request (the engine's in-flight
    count is vLLM's own count of unfinished requests)."""
    body = {
        "model": httpx.get(server.url + "/models").json()["data"][0]["id"],
        "prompt": "Tell me a long story.",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=120) as res:
        lines = res.iter_lines()
        seen = [next(lines) for _ in range(4)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the scrape races nothing, but be patient
            during = metric(server.metrics(), "dynamo_engine_inflight_requests")
            if during == 1:
                break
            time.sleep(0.1)
        assert during == 1, (seen, server.log()[-2000:])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        values = server.metrics()
        if metric(values, "dynamo_engine_inflight_requests") == 0:
            break
        time.sleep(0.05)
    assert metric(values, "dynamo_engine_inflight_requests") == 0
    assert metric(values, "dynamo_frontend_inflight_requests") == 0


# --- the chat shell -------------------------------------------------------------------------


def test_shell_chat_and_ctrl_c(hf_folder: Path, tmp_path: Path) -> None:
    """Chat in a real pty; Ctrl-C stops an answer without reaching vLLM's engine core (it
    would shut down), so the next question is answered."""
    env = {
        **os.environ,
        **VLLM_ENV,
        "DYN_HISTORY_FILE": str(tmp_path / "history"),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
        "NO_COLOR": "1",
    }
    template = tmp_path / "greedy.json"
    template.write_text(json.dumps({"temperature": 0}))
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "dynamo_run",
            "in=text",
            "out=vllm",
            str(hf_folder),
            *FLAGS,
            "--request-template",
            str(template),
        ],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        dimensions=(40, 200),
        timeout=START_S,
    )
    try:
        child.expect("ready")
        child.expect_exact("Send a message")
        child.timeout = 120
        child.sendline("Write a very long essay about the history of Rome.")
        child.expect_exact("history of Rome.")  # the line as typed; the answer streams next
        time.sleep(2.0)
        child.sendcontrol("c")
        child.expect("answer stopped")
        child.expect_exact("Send a message")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect_exact("Send a message")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


# --- in=batch -------------------------------------------------------------------------------


def test_batch(hf_folder: Path, tmp_path: Path) -> None:
    greedy = {"temperature": 0, "max_tokens": 20}
    rows = [
        {"text": "What is the capital of France?", **greedy},
        {"messages": [{"role": "user", "content": "Say hello."}], **greedy},
        {
            "custom_id": "cmpl",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once upon a time", **greedy},
        },
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli(
        f"in=batch:{inp}", "out=vllm", str(hf_folder), *FLAGS, timeout=START_S, env=VLLM_ENV
    )
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert len(out) == 3 and all(r["error"] is None for r in out)
    assert "Paris" in out[0]["response"]
    assert out[1]["response"].strip() and 0 < out[1]["tokens_out"] <= 20
    assert out[2]["response"]["body"]["choices"][0]["text"]
    assert "3 of 3 lines: 3 ok, 0 failed" in result.stderr
    assert "Traceback" not in result.stderr


# --- a worker behind out=dyn ----------------------------------------------------------------


@pytest.fixture()
def procs() -> Iterator[list]:
    yield from start_procs()


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    yield from start_nats()


def test_worker_behind_out_dyn_with_kv_routing(
    hf_folder: Path, nats: NatsServer, procs: list
) -> None:
    worker = Worker(nats.url, out="vllm", model=str(hf_folder), args=FLAGS, env=VLLM_ENV)
    procs.append(worker)
    worker.wait_ready(timeout=START_S)
    front = frontend(nats.url, args=["--router-mode", "kv"])
    procs.append(front)
    front.wait_ready(timeout=60)
    [name] = wait_models(front, [hf_folder.name], timeout=60)
    client = openai.OpenAI(base_url=front.url, api_key="x", max_retries=0, timeout=120)
    long_question = [
        {"role": "user", "content": "Summarise the history of Paris. " * 30 + "Be brief."}
    ]
    for _ in range(2):
        res = client.chat.completions.create(
            model=name, messages=long_question, temperature=0, max_tokens=8
        )
        assert res.choices[0].message.content
    res = client.chat.completions.create(model=name, messages=CAPITAL, temperature=0, max_tokens=30)
    assert "Paris" in res.choices[0].message.content
    # The worker forwarded vLLM's KV events (the long prompt's blocks) and put vLLM's
    # numbers (KV blocks, sequences) into discovery.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ps = run_cli("ps", "--nats-url", nats.url, "--json", timeout=60)
        assert ps.returncode == 0, ps.stderr
        [row] = json.loads(ps.stdout)
        if (row.get("kv_cached_blocks") or 0) >= 8 and row.get("load"):
            break
        time.sleep(0.5)
    assert row["engine"] == "vllm"
    assert row["kv_cached_blocks"] >= 8  # 16-token blocks of the 128-token vLLM blocks
    assert row["load"]["kv_blocks_total"] > 0 and row["load"]["slots_total"] > 0
    assert worker.stop() == 0, worker.log()


# --- one-line errors --------------------------------------------------------------------------


def test_gguf_to_vllm_is_one_line(default_gguf: Path) -> None:
    result = run_cli("out=vllm", str(default_gguf), "-p", "hi", timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "GGUF" in lines[0] and "out=llamacpp" in lines[0]


def test_model_vllm_cannot_load_is_one_line(hf_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken / name).write_bytes((hf_folder / name).read_bytes())
    config = json.loads((hf_folder / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    result = run_cli("out=vllm", str(broken), *FLAGS, "-p", "hi", timeout=START_S, env=VLLM_ENV)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dynamo-run: error: out=vllm: vllm could not load")
    assert "Traceback" not in result.stderr


# --- logging ----------------------------------------------------------------------------------


def test_dyn_log_debug_shows_vllm_debug_lines(hf_folder: Path, tmp_path: Path) -> None:
    """The engine gets the verbosity in its config (not from a logger level): DYN_LOG=debug
    is -vv, so vLLM's own debug lines reach stderr."""
    template = tmp_path / "short.json"
    template.write_text(json.dumps({"temperature": 0, "max_tokens": 4}))
    args = ("out=vllm", str(hf_folder), *FLAGS, "--request-template", str(template))
    result = run_cli(*args, "-p", "Say hi.", env={"DYN_LOG": "debug"}, timeout=START_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vllm DEBUG: " in result.stderr, result.stderr[-3000:]
