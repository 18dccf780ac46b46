"""The models a server serves, whatever its transport (HTTP, gRPC).

A server listens before its model is loaded, so every request first asks whether the
models are ready, then looks its model up by name. Both answers, and the metrics that come
with the models once loaded, live here; each transport only turns the exceptions below
into its own statuses (HTTP 503/400/404, gRPC UNAVAILABLE/INVALID_ARGUMENT/NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import sys
import time

from dynamo_run.errors import RunError
from dynamo_run.metrics import FrontendMetrics
from dynamo_run.pipeline.admission import (
    Admission,
    AdmissionSettings,
    Ticket,
    capacity_of,
)
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.pipeline.directory import ModelDirectory, SingleModel


class ServingError(Exception):
    """A request that the models cannot serve now; the message is one line for the client."""


class NotReady(ServingError):
    """Nothing is served yet: the model is still loading, or failed to (``failed``)."""

    def __init__(self, failed: bool) -> None:
        super().__init__(
            "the model failed to load" if failed else "the model is loading; retry shortly"
        )
        self.failed = failed


class ModelRequired(ServingError):
    """No model named, and more than one is served."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"a model is required: this server serves {', '.join(names)}")
        self.names = names


class NoInstances(ServingError):
    """Models come from remote workers and none serves the one asked for (None: any)."""

    def __init__(self, name: str | None, where: str) -> None:
        what = "any model" if name is None else f"model `{name}`"
        super().__init__(f"no live instance serves {what} in {where}")
        self.name = name
        self.where = where


class ModelNotFound(ServingError):
    """The named model is not one this server serves."""

    def __init__(self, name: str, names: list[str]) -> None:
        served = ", ".join(f"`{n}`" for n in names)
        what = f"this server serves {served}" if names else "no model is served here now"
        super().__init__(f"The model `{name}` does not exist; {what}.")
        self.name = name
        self.names = names


class ServedModels:
    """The loading model(s) of one server process, shared by all its inputs.

    ``loading`` gives one local model (a ModelClient) or a directory of models (``out=dyn``:
    whatever live workers serve). Once loaded, the engine's gauges and the directory's
    collector join ``metrics``: once, however many inputs share this object."""

    def __init__(
        self,
        loading: asyncio.Task[ModelClient] | asyncio.Task[ModelClient | ModelDirectory],
        metrics: FrontendMetrics | None = None,
        admission: AdmissionSettings | None = None,
    ) -> None:
        self.loading = loading
        self.metrics = metrics or FrontendMetrics()
        self.created = int(time.time())
        self.admission = admission or AdmissionSettings()
        self._directory: ModelDirectory | None = None
        self._gates: dict[str, tuple[ModelClient, Admission]] = {}
        loading.add_done_callback(lambda task: self.loaded())

    def loaded(self) -> ModelDirectory | None:
        """The directory once loaded, else None. (The task's done callback runs a loop turn
        after it ends, so a request in between finds it here, from the task itself.)"""
        if self._directory is None and self.loading.done():
            if self.loading.cancelled() or self.loading.exception() is not None:
                return None
            result = self.loading.result()
            if isinstance(result, ModelClient):
                self._directory = SingleModel(result)
                self.metrics.watch_engine(result.card.name, result.engine)
            else:
                self._directory = result
            collector = self._directory.metrics_collector()
            if collector is not None:
                self.metrics.registry.register(collector)
        return self._directory

    def failed(self) -> bool:
        """Loading ended without models (an error, or cancelled)."""
        return self.loading.done() and self.loaded() is None

    def directory(self) -> ModelDirectory:
        """The loaded directory; NotReady while loading or after a failed load."""
        directory = self.loaded()
        if directory is None:
            raise NotReady(failed=self.loading.done())
        return directory

    def names(self) -> list[str]:
        """The models served now ([] while loading)."""
        directory = self.loaded()
        return directory.names() if directory is not None else []

    def clients(self) -> list[ModelClient]:
        """The client of every model served now; NotReady while loading."""
        directory = self.directory()
        return [c for name in directory.names() if (c := directory.get(name)) is not None]

    def lookup(self, name: str | None) -> ModelClient:
        """The client for model ``name``; None (or ""): the only one served. Raises
        NotReady, ModelRequired, NoInstances or ModelNotFound."""
        directory = self.directory()
        names = directory.names()
        if not name:
            if len(names) == 1:
                client = directory.get(names[0])
                if client is not None:
                    return client
            if len(names) > 1:
                raise ModelRequired(names)
            raise NoInstances(None, directory.where or "this server")
        client = directory.get(name)
        if client is not None:
            return client
        if directory.where and directory.was_served(name):
            raise NoInstances(name, directory.where)  # its workers are gone, or busy coming
        raise ModelNotFound(name, names)  # a name never served: no retry will help

    def _gate(self, client: ModelClient) -> Admission:
        gate = self._gates.get(client.card.name)
        if gate is None or gate[0] is not client:  # first request, or the model came back
            capacity = capacity_of(client.engine, self.admission)
            gate = (client, Admission(capacity, self.admission, client.card.name))
            self._gates[client.card.name] = gate
        return gate[1]

    def check_room(self, client: ModelClient) -> None:
        """Raise Overloaded at once, before any templating, if the model takes no request
        now (cheap, so that refusing costs little under overload)."""
        self._gate(client).check()

    def admit(self, client: ModelClient, choices: int) -> Ticket:
        """Count a request's ``choices`` against its model's capacity and queue, or raise
        Overloaded when both are full. Release the ticket when the answer ends."""
        return self._gate(client).enter(choices)

    def model_name(self) -> str:
        """The metrics label for requests that name no model: the model, when only one."""
        names = self.names()
        return names[0] if len(names) == 1 else ""


def describe(loaded: ModelClient | ModelDirectory) -> str:
    """What a server serves, for its start-up line."""
    if isinstance(loaded, ModelClient):
        return loaded.card.name
    return f"the models of the workers in {loaded.where}"


def load_failed(loading: asyncio.Task[ModelClient] | asyncio.Task[object]) -> int:
    """Exit code after a failed load. The runner re-raises its own RunError and the CLI
    prints it as one line; anything else is printed here, once, without a traceback."""
    if loading.cancelled():
        return 1
    exc = loading.exception()
    if isinstance(exc, RunError):
        return 1
    print(
        f"dynamo-run: error: the model failed to load: {type(exc).__name__}: {exc}",
        file=sys.stderr,
        flush=True,
    )
    return 1
