"""Every engine declares what it can do in ``capabilities()``, and implements what it claims.

Inputs never probe an engine's attributes: they read ``EngineCapabilities`` and call the
methods of the ``Engine`` protocol. So a capability an engine claims without implementing
its method (or a method that nothing reaches because the flag is never set) would be a
silent feature loss; this file checks each engine of the repository for both, and that no
registered engine escapes the check. The echo, mocker and llama.cpp engines run for real
(the default model); vLLM, SGLang and TensorRT-LLM cannot start here, so their adapters
are built around a stand-in for the library object they wrap, which is all the capability
code reads.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_run.distributed.remote_engine import RemoteEngine
from dynamo_run.distributed.router import Router
from dynamo_run.distributed.wire import InstanceRecord
from dynamo_run.engine import (
    CAPABILITY_METHODS,
    Engine,
    EngineCapabilities,
    EngineConfig,
    EngineError,
    installed_engines,
)
from dynamo_run.model.card import ModelCard
from dynamo_run.protocol.internal import EngineLoad

REPO = Path(__file__).resolve().parent.parent
for plugin in ("llamacpp", "vllm", "sglang", "trtllm"):  # plugins not installed: the checkout
    if str(REPO / "engines" / plugin) not in sys.path:
        sys.path.append(str(REPO / "engines" / plugin))

# Every engine of the repository: its registered name -> its class.
ENGINE_CLASSES = {
    "echo": "dynamo_run.echo:EchoEngine",
    "mocker": "dynamo_run.mocker.engine:MockerEngine",
    "llamacpp": "dynamo_run_llamacpp.engine:LlamaCppEngine",
    "vllm": "dynamo_run_vllm.engine:VllmEngine",
    "sglang": "dynamo_run_sglang.engine:SGLangEngine",
    "trtllm": "dynamo_run_trtllm.engine:TrtLlmEngine",
}
# Names by which engines told inputs what they could do before capabilities(): read by
# nothing now, so one left on a class is a declaration that silently does nothing.
STALE_NAMES = ("supports_json_object", "supports_json_schema", "max_concurrency", "remote")


def _class(target: str) -> type:
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:  # the engine's own library is missing (llama_cpp)
        pytest.skip(f"{module} cannot be imported here: {exc}")


def test_every_registered_engine_is_checked_here() -> None:
    """A newly registered engine must join ENGINE_CLASSES (and so the checks below)."""
    assert set(installed_engines()) <= set(ENGINE_CLASSES)
    for name in installed_engines():
        module, _, attr = installed_engines()[name].partition(":")
        factory = getattr(importlib.import_module(module), attr)
        returns = inspect.signature(factory).return_annotation
        assert str(returns).split(".")[-1] == ENGINE_CLASSES[name].split(":")[1], name


@pytest.mark.parametrize("name", sorted(ENGINE_CLASSES))
def test_engine_classes_implement_the_protocol(name: str) -> None:
    cls = _class(ENGINE_CLASSES[name])
    assert Engine in cls.__mro__, f"{cls.__name__} does not subclass the Engine protocol"
    assert not inspect.isabstract(cls), (
        f"{cls.__name__} misses {getattr(cls, '__abstractmethods__', ())}"
    )
    stale = [n for n in STALE_NAMES if hasattr(cls, n)]
    assert not stale, f"{cls.__name__} declares {stale}: say it in capabilities()"


# --- instances, in each state that changes what they can do ------------------------------
def _echo(card: ModelCard) -> Iterator[Engine]:
    from dynamo_run.echo import EchoEngine

    yield EchoEngine(0)


def _mocker(card: ModelCard) -> Iterator[Engine]:
    from dynamo_run.mocker import create_engine

    yield create_engine(card, EngineConfig())


def _llamacpp(card: ModelCard) -> Iterator[Engine]:
    _class(ENGINE_CLASSES["llamacpp"])
    from dynamo_run_llamacpp import create_engine

    engine = create_engine(card, EngineConfig(extra={"n_parallel": 2}))
    try:
        yield engine
    finally:
        asyncio.run(engine.close())


def _vllm(card: ModelCard) -> Iterator[Engine]:
    cls = _class(ENGINE_CLASSES["vllm"])
    config = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=2048),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
        cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=100),
    )
    llm = SimpleNamespace(
        vllm_config=config, get_kv_event_sources=dict, get_num_unfinished_requests=lambda: 0
    )
    engine = cls(llm, 16, SimpleNamespace(running=0, kv_usage=0.0), Path("log"), None)
    yield engine  # the engine core publishes no KV events to us
    engine.subscriber = SimpleNamespace()  # it does: what start() sets up by default
    yield engine


def _sglang(card: ModelCard) -> Iterator[Engine]:
    cls = _class(ENGINE_CLASSES["sglang"])
    from dynamo_run_sglang.kv_events import KvEventTranslator

    yield cls(SimpleNamespace())  # KV events go to the user's own kv_events_config
    yield cls(SimpleNamespace(), kv=KvEventTranslator(16))


def _trtllm(card: ModelCard) -> Iterator[Engine]:
    cls = _class(ENGINE_CLASSES["trtllm"])
    yield cls(SimpleNamespace(), lambda kwargs: kwargs, block_size=16, context_length=1024)


def _record(n: int, schema: bool) -> InstanceRecord:
    return InstanceRecord(
        f"i{n}", "ns", "c", "e", f"dyn.ns.c.e.i{n}", "m", "echo", "h", 1, "d", 0.0, 0.0, 10.0,
        supports_json_object=True, supports_json_schema=schema,
    )  # fmt: skip


def _remote(card: ModelCard) -> Iterator[Engine]:
    for live in ([], [_record(1, True), _record(2, False)], [_record(1, True)]):
        yield RemoteEngine("m", _fixed(live), None, Router())  # type: ignore[arg-type]


def _fixed(live: list[InstanceRecord]) -> Callable[[], list[InstanceRecord]]:
    return lambda: live


BUILDERS: dict[str, Callable[[ModelCard], Iterator[Engine]]] = {
    "echo": _echo,
    "mocker": _mocker,
    "llamacpp": _llamacpp,
    "vllm": _vllm,
    "sglang": _sglang,
    "trtllm": _trtllm,
    "remote": _remote,
}


def test_every_engine_is_built_here() -> None:
    assert set(BUILDERS) == {*ENGINE_CLASSES, "remote"}


def _overrides(engine: Engine, method: str) -> bool:
    return getattr(type(engine), method) is not getattr(Engine, method)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_capabilities_claim_only_what_the_engine_implements(
    name: str, default_card: ModelCard
) -> None:
    claimed: set[str] = set()
    for engine in BUILDERS[name](default_card):
        can = engine.capabilities()
        assert isinstance(can, EngineCapabilities)
        for flag, method in CAPABILITY_METHODS.items():
            if getattr(can, flag):
                claimed.add(flag)
                assert _overrides(engine, method), f"{name} claims {flag} without {method}()"
        for limit in (can.max_concurrency, can.context_per_sequence):
            assert limit is None or (isinstance(limit, int) and limit > 0)
        load = engine.load()
        assert isinstance(load, EngineLoad) and load.in_flight == 0
        if not can.kv_events and not _overrides(engine, "set_kv_event_sink"):
            with pytest.raises(EngineError, match="does not report KV events"):
                engine.set_kv_event_sink(lambda event: None)
        if not can.embeddings:
            with pytest.raises(EngineError, match="does not compute embeddings"):
                asyncio.run(engine.embed([[1, 2]]))
    # A method no state of the engine ever claims is a feature nothing can reach.
    for flag, method in CAPABILITY_METHODS.items():
        if flag not in claimed:
            assert not _overrides(engine, method), f"{name} has {method}() but never {flag}"


def test_what_the_engines_claim(default_card: ModelCard) -> None:
    """The declarations themselves, so that dropping a claim is a visible change."""
    wanted = {
        "echo": set(),
        "mocker": {"kv_events", "max_concurrency"},
        "llamacpp": {
            "embeddings", "json_object", "json_schema", "kv_events", "max_concurrency",
            "context_per_sequence",
        },
        "vllm": {"json_object", "json_schema", "kv_events", "max_concurrency",
                 "context_per_sequence"},
        "sglang": {"json_object", "json_schema", "kv_events"},
        "trtllm": {"json_object", "json_schema", "kv_events", "context_per_sequence"},
        "remote": {"json_object", "json_schema", "remote"},
    }  # fmt: skip
    for name, expected in wanted.items():
        if name == "llamacpp":
            continue  # needs the real model: checked by test_llamacpp_claims_run
        try:
            states = list(BUILDERS[name](default_card))
        except pytest.skip.Exception:
            continue
        got = {f.name for s in states for f in fields(EngineCapabilities) if _set(s, f.name)}
        assert got == expected, name


def _set(engine: Engine, name: str) -> bool:
    value: Any = getattr(engine.capabilities(), name)
    return value is not None and value is not False


def test_llamacpp_claims_run(default_card: ModelCard) -> None:
    """What llama.cpp claims works: embeddings, a schema check, KV events, its limits."""
    for engine in _llamacpp(default_card):
        can = engine.capabilities()
        assert can.embeddings and can.json_object and can.json_schema and can.kv_events
        assert can.max_concurrency == 2
        assert can.context_per_sequence and can.context_per_sequence <= default_card.context_length
        vectors = asyncio.run(engine.embed([default_card.tokenizer.encode("hello").ids]))
        assert len(vectors) == 1 and len(vectors[0]) > 0
        assert engine.check_json_schema({"type": "object"}) is None
        assert engine.check_json_schema({"type": "no-such-type"}) is not None
        engine.set_kv_event_sink(lambda event: None)
        engine.set_kv_event_sink(None)
        assert engine.load().slots_total == 2


def test_remote_capabilities_come_from_the_workers_registrations(
    default_card: ModelCard,
) -> None:
    states = [e.capabilities() for e in _remote(default_card)]
    assert [(c.json_object, c.json_schema, c.remote) for c in states] == [
        (False, False, True),  # no live worker: nothing can be promised
        (True, False, True),  # one of two cannot enforce a schema: any may be picked
        (True, True, True),
    ]


def test_an_engine_outside_the_contract_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, default_card: ModelCard
) -> None:
    """A plugin written before capabilities() (generate and close only) is refused at start,
    not left to fail on the first request."""
    from dynamo_run import runner
    from dynamo_run.errors import RunError
    from dynamo_run.spec import Flags, parse_run_spec

    class OldEngine:
        async def generate(self, request: Any) -> Any:
            yield None

        async def close(self) -> None:
            return None

    monkeypatch.setattr(runner, "load_engine_factory", lambda name: lambda card, cfg: OldEngine())
    spec = parse_run_spec(["out=echo"], Flags())
    with pytest.raises(RunError, match="OldEngine does not implement dynamo-run's Engine"):
        runner.start_engine("old", default_card, spec)
