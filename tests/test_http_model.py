"""``dynamo-run in=http out=llamacpp`` with the real default model (SmolLM2-135M)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from http_helpers import MODEL_NAME, Server, metric, start_server

pytestmark = pytest.mark.model

try:
    from dynamo_run_llamacpp.engine import LlamaCppEngine
except ImportError:  # pragma: no cover - the engine is an optional distribution
    LlamaCppEngine = None  # type: ignore[assignment,misc]

needs_engine = pytest.mark.skipif(
    LlamaCppEngine is None, reason="dynamo-run-llamacpp not installed"
)
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    if LlamaCppEngine is None:
        pytest.skip("dynamo-run-llamacpp not installed")
    yield from start_server(out="llamacpp")


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def test_chat_answers(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24)
    choice = res.choices[0]
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert res.usage is not None and 0 < res.usage.completion_tokens <= 24


def test_greedy_stream_matches_whole(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        res = client.completions.create(
            model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=seed
        )
        return res.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_n_choices_differ_when_sampling(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model=MODEL_NAME, prompt="My favourite food is", max_tokens=12, temperature=1.0, seed=7, n=2
    )
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[0].text != res.choices[1].text


def test_stop_string_cuts_answer(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=["7"]
    )
    assert "7" not in res.choices[0].text
    assert res.choices[0].finish_reason == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3
    )
    logprobs = res.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert len(logprobs.content) == res.usage.completion_tokens  # type: ignore[union-attr]
    for item in logprobs.content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.bytes == list(item.token.encode())
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob


def test_completion_logprobs_streamed(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL_NAME, prompt="The sky is", max_tokens=6, logprobs=2, stream=True
    )
    tokens, offsets = [], []
    text = ""
    for chunk in stream:
        text += chunk.choices[0].text
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens or []
            offsets += chunk.choices[0].logprobs.text_offset or []
    assert len(tokens) == 6 and offsets[0] == 0
    assert "".join(tokens) == text


def test_embeddings(client: openai.OpenAI) -> None:
    res = client.embeddings.create(model=MODEL_NAME, input=["hello world", "hello world", "tax"])
    vectors = [d.embedding for d in res.data]  # the client asks for base64 and decodes it
    assert [d.index for d in res.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100
    assert vectors[0] == pytest.approx(vectors[1])
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)
    assert res.usage.prompt_tokens == res.usage.total_tokens > 0
    floats = httpx.post(
        str(client.base_url) + "embeddings", json={"input": "tax", "encoding_format": "float"}
    ).json()
    assert floats["data"][0]["embedding"] == pytest.approx(vectors[2], abs=1e-6)


def test_json_object(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Give a JSON object with a name."}],
        response_format={"type": "json_object"},
        max_tokens=60,
    )
    content = res.choices[0].message.content or ""
    assert content.lstrip().startswith("{"), content
    if res.choices[0].finish_reason == "stop":  # not cut by max_tokens: a whole object
        assert isinstance(json.loads(content), dict)


def test_hang_up_frees_the_engine(server: Server) -> None:
    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as res:
        lines = res.iter_lines()
        for _ in range(6):
            next(lines)
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        values = server.metrics()
        if metric(values, "dynamo_engine_inflight_requests") == 0:
            break
        time.sleep(0.02)
    assert metric(values, "dynamo_engine_inflight_requests") == 0
    assert metric(values, "dynamo_frontend_inflight_requests") == 0


@needs_engine
def test_503_while_the_model_loads() -> None:
    """Poll from the moment the port opens: 503s with a JSON body, then 200."""
    srv = Server(out="llamacpp")
    statuses: list[int] = []
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=2) as http:
            while time.monotonic() < deadline and srv.proc.poll() is None:
                try:
                    res = http.post(
                        srv.url + "/completions", json={"prompt": "hi", "max_tokens": 1}
                    )
                except httpx.TransportError:
                    time.sleep(0.01)
                    continue
                statuses.append(res.status_code)
                if res.status_code == 503:
                    assert res.json()["error"]["code"] == "model_loading"
                if res.status_code == 200:
                    break
        assert statuses and statuses[-1] == 200, srv.log()
        assert set(statuses) <= {503, 200}
        if 503 not in statuses:
            pytest.skip("the model loaded before the first request reached the server")
        assert srv.stop() == 0
    finally:
        srv.cleanup()
