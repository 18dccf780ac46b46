"""The ASGI app in-process, for states a live process cannot be held in on demand: the model
still loading, a failed load, and an engine that fails mid-request.

``FailingEngine`` below is not a stand-in for a shipped engine: it is a third engine that
implements the Engine protocol and reports errors the way a real engine does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest

from dynamo_run.echo import EchoEngine
from dynamo_run.engine import Engine, EngineCapabilities
from dynamo_run.inputs.http.app import create_app
from dynamo_run.model.card import ModelCard, load_model_card
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.pipeline.serving import ServedModels
from dynamo_run.protocol.internal import FINISH_ERROR, EngineLoad, EngineOutput, PreprocessedRequest


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_model_card(None)


class FailingEngine(Engine):
    """Emits ``good`` tokens of the prompt, then reports an engine error (or raises)."""

    def __init__(self, good: int = 2, crash: bool = False) -> None:
        self.good = good
        self.crash = crash

    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities()

    def load(self) -> EngineLoad:
        return EngineLoad()

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        for token in request.token_ids[: self.good]:
            yield EngineOutput([token])
        if self.crash:
            raise RuntimeError("a bug in the engine")
        yield EngineOutput(finish_reason=FINISH_ERROR, error="out of KV cache")

    async def close(self) -> None:
        return None


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_503_while_loading_then_200(card: ModelCard) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        async def load() -> ModelClient:
            await gate.wait()
            return ModelClient(card, EchoEngine(0))

        loading = asyncio.create_task(load())
        app = create_app(ServedModels(loading))
        async with _client(app) as http:
            for path in ("/health", "/live"):
                res = await http.get(path)
                assert res.status_code == 503
                assert res.json()["status"] == "loading"
            res = await http.post("/v1/completions", json={"prompt": "hi"})
            assert res.status_code == 503
            assert res.headers["retry-after"] == "1"
            error = res.json()["error"]
            assert error["code"] == "model_loading"
            assert error["type"] == "service_unavailable"
            assert (await http.get("/v1/models")).status_code == 503
            assert (await http.get("/metrics")).status_code == 200
            gate.set()
            await loading
            res = await http.get("/health")
            assert res.status_code == 200
            res = await http.post("/v1/completions", json={"prompt": "hi"})
            assert res.json()["choices"][0]["text"] == "hi"

    _run(scenario())


def test_ready_the_moment_loading_ends(card: ModelCard) -> None:
    """A request that lands after the load finished but before the task's done callbacks
    ran must be served, not told the load failed."""

    async def scenario() -> None:
        async def load() -> ModelClient:
            return ModelClient(card, EchoEngine(0))

        loading = asyncio.create_task(load())
        while not loading.done():
            await asyncio.sleep(0)
        models = ServedModels(loading)  # its done callback is only scheduled now
        assert models.lookup(None) is loading.result()

    _run(scenario())


def test_503_after_failed_load() -> None:
    async def scenario() -> None:
        async def load() -> ModelClient:
            raise OSError("disk on fire")

        loading = asyncio.create_task(load())
        app = create_app(ServedModels(loading))
        await asyncio.gather(loading, return_exceptions=True)
        async with _client(app) as http:
            res = await http.get("/health")
            assert res.status_code == 503 and res.json()["status"] == "failed"
            res = await http.post("/v1/chat/completions", json={"messages": []})
            assert res.json()["error"]["code"] == "model_load_failed"

    _run(scenario())


def _serve(card: ModelCard, engine: Any) -> Any:
    async def ready() -> ModelClient:
        return ModelClient(card, engine)

    return ready


def test_engine_failure_is_500_unary(card: ModelCard) -> None:
    async def scenario() -> None:
        loading = asyncio.create_task(_serve(card, FailingEngine())())
        app = create_app(ServedModels(loading))
        await loading
        async with _client(app) as http:
            res = await http.post("/v1/completions", json={"prompt": "one two three"})
            assert res.status_code == 500
            error = res.json()["error"]
            assert error["code"] == "engine_error"
            assert "out of KV cache" in error["message"]
            res = await http.post("/v1/completions", json={"prompt": "one two", "n": 3})
            assert res.status_code == 500

    _run(scenario())


def test_engine_failure_mid_stream_is_an_error_event(card: ModelCard) -> None:
    async def scenario() -> None:
        loading = asyncio.create_task(_serve(card, FailingEngine())())
        app = create_app(ServedModels(loading))
        await loading
        async with _client(app) as http:
            body = {"prompt": "one two three", "stream": True}
            res = await http.post("/v1/completions", json=body)
            events = [ln.removeprefix("data: ") for ln in res.text.split("\n\n") if ln]
        assert res.status_code == 200
        assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["one", " two"]
        assert json.loads(events[2])["error"]["code"] == "engine_error"
        assert events[3] == "[DONE]"

    _run(scenario())


def test_engine_crash_never_shows_a_traceback(card: ModelCard) -> None:
    async def scenario() -> None:
        loading = asyncio.create_task(_serve(card, FailingEngine(crash=True))())
        app = create_app(ServedModels(loading))
        await loading
        async with _client(app) as http:
            res = await http.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            assert res.status_code == 500
            assert res.json()["error"]["message"] == "internal server error"
            assert "Traceback" not in res.text and "a bug" not in res.text
            body = {"prompt": "one two", "stream": True}
            res = await http.post("/v1/completions", json=body)
            assert res.status_code == 200
            assert '"internal_error"' in res.text and "Traceback" not in res.text
            assert res.text.endswith("data: [DONE]\n\n")

    _run(scenario())


def test_json_object_allowed_when_engine_declares_it(card: ModelCard) -> None:
    class ConstrainedEcho(EchoEngine):
        def capabilities(self) -> EngineCapabilities:
            return EngineCapabilities(json_object=True)

    async def scenario() -> None:
        loading = asyncio.create_task(_serve(card, ConstrainedEcho(0))())
        app = create_app(ServedModels(loading))
        await loading
        async with _client(app) as http:
            body = {
                "messages": [{"role": "user", "content": "{}"}],
                "response_format": {"type": "json_object"},
                "max_tokens": 2,
            }
            res = await http.post("/v1/chat/completions", json=body)
            assert res.status_code == 200
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x"}}
            res = await http.post("/v1/chat/completions", json=body)
            assert res.status_code == 400
            assert res.json()["error"]["param"] == "response_format"

    _run(scenario())
