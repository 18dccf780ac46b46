"""Build the pipeline for a RunSpec, run its input, and shut everything down cleanly."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable

from dynamo_run.distributed.frontend_runner import RemoteOutput
from dynamo_run.engine import (
    HF_ENGINES,
    Engine,
    EngineConfig,
    EngineError,
    engine_usability,
    install_hint,
    load_engine_factory,
)
from dynamo_run.errors import RunError
from dynamo_run.model.card import CardOverrides, ModelCard, ModelCardError, load_model_card
from dynamo_run.model.resolve import ModelNotFoundError
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.spec import SERVER_INPUTS, RunSpec

log = logging.getLogger("dynamo_run")

# Input kind -> "module:function" taking (client, spec) and returning an exit code.
INPUT_RUNNERS: dict[str, str] = {
    "text": "dynamo_run.inputs.text.shell:run_text",
    "batch": "dynamo_run.inputs.batch.run:run_batch",
    "http": "dynamo_run.inputs.http.server:run_http",
    "grpc": "dynamo_run.inputs.grpc.server:run_grpc",
    "http,grpc": "dynamo_run.inputs.grpc.server:run_http_grpc",
    "dyn": "dynamo_run.inputs.dyn.worker:run_worker",
}

# Engines that `out=auto` may pick, best first, per model format.
AUTO_ENGINES: dict[str, tuple[str, ...]] = {
    "gguf": ("llamacpp",),
    "hf": HF_ENGINES,
}


def choose_engine(spec: RunSpec, card: ModelCard) -> str:
    """The engine name for out=ENGINE, resolving out=auto from the model's format: the
    first engine for it that is installed and usable here."""
    if spec.output.kind != "auto":
        return spec.output.kind
    wanted = AUTO_ENGINES.get(card.kind, ())
    usable = engine_usability(list(wanted))
    for name in wanted:
        if name in usable and usable[name] is None:
            return name
    why = "; ".join(f"{name}: {reason}" for name, reason in usable.items() if reason)
    hint = install_hint(wanted[0]) if wanted else "pass out=echo"
    raise RunError(
        f"out=auto: no engine for a {card.kind.upper()} model is installed and usable here"
        f"{f' ({why})' if why else ''}; {hint}"
    )


def check_engine(name: str) -> None:
    """Fail with one line if engine ``name`` is missing or cannot run on this machine."""
    reason = engine_usability([name]).get(name, "not installed")
    if reason == "not installed":
        raise RunError(f"out={name}: the {name} engine is not installed; {install_hint(name)}")
    if reason:
        raise RunError(f"out={name}: {reason}")


def start_engine(name: str, card: ModelCard, spec: RunSpec) -> Engine:
    try:
        factory = load_engine_factory(name)
        config = EngineConfig(
            context_length=card.context_length,
            kv_cache_block_size=spec.flags.kv_cache_block_size,
            extra=dict(spec.extra_engine_args),
            tensor_parallel_size=spec.flags.tensor_parallel_size,
            verbosity=spec.flags.verbosity,
        )
        engine = factory(card, config)
    except EngineError as exc:
        raise RunError(f"out={name}: {exc}") from exc
    if not isinstance(engine, Engine):  # a plugin written against an older contract
        raise RunError(
            f"out={name}: {type(engine).__name__} does not implement dynamo-run's Engine "
            "protocol (capabilities(), load(), generate(), close())"
        )
    return engine


def card_overrides(spec: RunSpec) -> CardOverrides:
    """The card settings the command line gives (chat template, output parsers)."""
    return CardOverrides(
        spec.chat_template, spec.flags.tool_call_parser, spec.flags.reasoning_parser
    )


def load_card(spec: RunSpec) -> ModelCard:
    try:
        card = load_model_card(spec.model, spec.flags.model_name, spec.flags.context_length)
    except (ModelNotFoundError, ModelCardError) as exc:
        raise RunError(f"model: {exc}") from exc
    return card_overrides(spec).apply(card)


InputRunner = Callable[["asyncio.Task[ModelClient]", RunSpec], Awaitable[int]]


def input_runner(kind: str) -> InputRunner:
    target = INPUT_RUNNERS.get(kind)
    if target is None:
        raise RunError(f"in={kind} is not available in this build")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


async def load_client(spec: RunSpec) -> ModelClient:
    """Resolve the model, pick and start the engine; off the event loop."""
    if spec.output.kind != "auto":  # before the model: a missing engine is the first thing
        check_engine(spec.output.kind)
    card = await asyncio.to_thread(load_card, spec)
    engine_name = choose_engine(spec, card)
    log.info("model %s (%s), engine %s", card.name, card.path, engine_name)
    engine = await asyncio.to_thread(start_engine, engine_name, card, spec)
    # An engine may hold less context per sequence than the model was trained for (llama.cpp
    # splits n_ctx between parallel sequences): the frontend must check against that.
    per_sequence = engine.capabilities().context_per_sequence
    if per_sequence:
        card.context_length = min(card.context_length, per_sequence)
    client = ModelClient(card, engine, spec.request_template, spec.flags.generation_config)
    client.engine_name = engine_name
    return client


async def run_async(spec: RunSpec) -> int:
    """Start loading the output, run the input until it ends, close the engine.

    The input receives the loading task rather than a client so that a server can listen
    (and answer 503) while the model loads. Returns the process exit code."""
    run_input = input_runner(spec.input.kind)
    if spec.output.is_engine:
        loading = asyncio.create_task(load_client(spec))
    else:
        remote = RemoteOutput(spec, card_overrides(spec))
        loading = asyncio.create_task(remote.load(for_http=spec.input.kind in SERVER_INPUTS))
    try:
        return await run_input(loading, spec)
    finally:
        if not spec.output.is_engine:
            if not loading.done():
                loading.cancel()
            await remote.close()
        elif not loading.done():
            loading.cancel()
        elif not loading.cancelled() and loading.exception() is None:
            await loading.result().engine.close()
        if loading.done() and not loading.cancelled():
            exc = loading.exception()
            if isinstance(exc, RunError):
                raise exc


def run(spec: RunSpec) -> int:
    return asyncio.run(run_async(spec))
