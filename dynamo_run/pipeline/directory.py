"""The models an input can serve: one local model, or whatever remote workers serve.

``in=http`` looks each request's model up here, so one server fronts one local engine or
every model in discovery through the same routes.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client.registry import Collector

from dynamo_run.pipeline.client import ModelClient


class ModelDirectory(Protocol):
    def names(self) -> list[str]:
        """The models served now."""
        ...

    def get(self, name: str) -> ModelClient | None:
        """The client for ``name``, or None if nothing serves it now."""
        ...

    def was_served(self, name: str) -> bool:
        """Whether ``name`` was ever served here: a model whose workers are gone or not
        ready is unavailable for now (503), a name never seen does not exist (404)."""
        ...

    @property
    def where(self) -> str:
        """Where models are looked for, for error messages ("" for a local model)."""
        ...

    def metrics_collector(self) -> Collector | None:
        """Series of its own for the server's /metrics (per worker instance), if any."""
        ...


class SingleModel:
    """A directory of one local model."""

    where = ""

    def __init__(self, client: ModelClient) -> None:
        self.client = client

    def names(self) -> list[str]:
        return [self.client.card.name]

    def get(self, name: str) -> ModelClient | None:
        return self.client if name == self.client.card.name else None

    def metrics_collector(self) -> Collector | None:
        return None  # the engine's gauges are the server's (FrontendMetrics.watch_engine)

    def was_served(self, name: str) -> bool:
        return name == self.client.card.name
