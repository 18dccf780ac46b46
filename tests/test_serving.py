"""The served models shared by in=http and in=grpc: readiness, lookup by name, metrics.

Models here are real ModelClients over the echo engine and the default model's card; the
many-model directory is the shape ``out=dyn`` gives (models named by live workers, a
``where``), with its per-instance collector, so both servers' answers to "which model?"
are checked against one implementation.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dynamo_run.echo import EchoEngine
from dynamo_run.inputs.grpc.service import _status_of
from dynamo_run.inputs.http.app import create_app
from dynamo_run.model.card import ModelCard, load_model_card
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.pipeline.serving import (
    ModelNotFound,
    ModelRequired,
    NoInstances,
    NotReady,
    ServedModels,
)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_model_card(None)


class Workers:
    """A directory of the models some remote workers serve (as RemoteModels is), with a
    per-instance series of its own."""

    where = "dyn://ns.backend.generate"

    def __init__(self, clients: list[ModelClient]) -> None:
        self.clients = {c.card.name: c for c in clients}
        self.seen = set(self.clients)
        self.collector = InstanceSeries()

    def was_served(self, name: str) -> bool:
        return name in self.seen

    def names(self) -> list[str]:
        return sorted(self.clients)

    def get(self, name: str) -> ModelClient | None:
        return self.clients.get(name)

    def metrics_collector(self) -> Collector | None:
        return self.collector


class InstanceSeries(Collector):
    def collect(self) -> Any:
        yield GaugeMetricFamily("dynamo_test_instances", "live instances", value=2)


def _named(card: ModelCard, name: str) -> ModelClient:
    return ModelClient(dataclasses.replace(card, name=name), EchoEngine(0))


def _loaded(result: Any) -> asyncio.Task[Any]:
    async def load() -> Any:
        return result

    return asyncio.get_running_loop().create_task(load())


def test_not_ready_while_loading_and_after_a_failed_load(card: ModelCard) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        async def load() -> ModelClient:
            await gate.wait()
            raise OSError("disk on fire")

        models = ServedModels(asyncio.create_task(load()))
        with pytest.raises(NotReady) as info:
            models.lookup(None)
        assert not info.value.failed and models.names() == [] and not models.failed()
        gate.set()
        await asyncio.gather(models.loading, return_exceptions=True)
        with pytest.raises(NotReady) as info:
            models.lookup("anything")
        assert info.value.failed and models.failed()

    asyncio.run(scenario())


def test_one_local_model(card: ModelCard) -> None:
    async def scenario() -> None:
        client = ModelClient(card, EchoEngine(0))
        models = ServedModels(_loaded(client))
        await models.loading
        assert models.lookup(None) is client and models.lookup(card.name) is client
        assert models.clients() == [client] and models.model_name() == card.name
        with pytest.raises(ModelNotFound) as info:
            models.lookup("gpt-4")
        assert info.value.names == [card.name] and "`gpt-4` does not exist" in str(info.value)
        # the engine's in-flight gauge is the server's
        sample = {"model": card.name}
        assert (
            models.metrics.registry.get_sample_value("dynamo_engine_inflight_requests", sample) == 0
        )

    asyncio.run(scenario())


def test_many_models_from_workers(card: ModelCard) -> None:
    async def scenario() -> None:
        a, b = _named(card, "a"), _named(card, "b")
        workers = Workers([a, b])
        models = ServedModels(_loaded(workers))
        await models.loading
        assert models.names() == ["a", "b"] and models.clients() == [a, b]
        assert models.lookup("b") is b and models.model_name() == ""
        with pytest.raises(ModelRequired):
            models.lookup(None)
        with pytest.raises(ModelNotFound):
            models.lookup("c")  # never served here: unknown, no retry will help
        workers.clients.clear()
        with pytest.raises(NoInstances) as info:
            models.lookup("a")  # served, its workers gone: one may come back
        assert info.value.where == workers.where
        with pytest.raises(NoInstances):
            models.lookup(None)
        # the directory's own series reach the server's registry, once
        registry: CollectorRegistry = models.metrics.registry
        assert registry.get_sample_value("dynamo_test_instances") == 2
        assert models.loaded() is workers
        assert registry.get_sample_value("dynamo_test_instances") == 2

    asyncio.run(scenario())


def test_each_transport_maps_the_same_answers(card: ModelCard) -> None:
    """HTTP statuses and gRPC codes for each answer of the one lookup."""
    cases = [
        (NotReady(failed=False), 503, grpc.StatusCode.UNAVAILABLE),
        (ModelRequired(["a", "b"]), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (NoInstances("c", "dyn://ns"), 503, grpc.StatusCode.UNAVAILABLE),
        (ModelNotFound("c", ["a"]), 404, grpc.StatusCode.NOT_FOUND),
    ]
    from dynamo_run.inputs.http.errors import known_error

    for exc, status, code in cases:
        error = known_error(exc)
        assert error is not None and error.status == status and error.message == str(exc)
        assert _status_of(exc).code == code and _status_of(exc).message == str(exc)


def test_http_routes_over_many_models(card: ModelCard) -> None:
    async def scenario() -> None:
        models = ServedModels(_loaded(Workers([_named(card, "a"), _named(card, "b")])))
        await models.loading
        app = create_app(models)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            listed = (await http.get("/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == ["a", "b"]
            message = [{"role": "user", "content": "hi"}]
            res = await http.post("/v1/chat/completions", json={"messages": message})
            assert res.status_code == 400 and res.json()["error"]["param"] == "model"
            res = await http.post(
                "/v1/chat/completions", json={"model": "b", "messages": message, "max_tokens": 4}
            )
            assert res.status_code == 200 and res.json()["model"] == "b"
            res = await http.post("/v1/chat/completions", json={"model": "c", "messages": message})
            assert res.status_code == 404 and res.json()["error"]["code"] == "model_not_found"
            assert "dynamo_test_instances 2.0" in (await http.get("/metrics")).text

    asyncio.run(scenario())
