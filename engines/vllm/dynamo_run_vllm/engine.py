"""The vLLM engine: vLLM's AsyncLLM driven with token ids, streaming token deltas.

vLLM runs its scheduler and model in an engine-core process of its own; the AsyncLLM in
this process hands it requests and collects outputs on the event loop that calls
``generate``. The engine core also publishes KV events on a private ZMQ socket, which a
thread here re-hashes for the router (kv_events.py), and its scheduler's numbers reach
``load()`` through a stat logger (stats.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from dynamo_run.engine import Engine, EngineCapabilities, EngineConfig, EngineError, KvEventSink
from dynamo_run.engine_support.errors import one_line
from dynamo_run.engine_support.startup_log import root_cause, stderr_to
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE
from dynamo_run.model.card import ModelCard
from dynamo_run.protocol.internal import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
)
from dynamo_run_vllm.detach import own_process_group
from dynamo_run_vllm.install import device_of, installed_build, unusable_reason
from dynamo_run_vllm.kv_events import KvEventMapper, KvEventSubscriber
from dynamo_run_vllm.logs import EXCEPTION_LINE, LOG_WRAPPERS, configure_vllm_logging
from dynamo_run_vllm.sampling import FINISH_REASONS, sampling_params, token_logprobs
from dynamo_run_vllm.stats import SchedulerSnapshot, stat_logger_factory

log = logging.getLogger("dynamo_run.vllm")


def _import_vllm() -> Any:
    """Import vLLM; a broken installation is one line (torchvision built for another torch
    fails here with "operator torchvision::nms does not exist")."""
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except Exception as exc:
        hint = ""
        if "torchvision" in str(exc) or "torchaudio" in str(exc):
            hint = "; pip uninstall torchvision torchaudio torchcodec (text models need none)"
        raise EngineError(f"vllm cannot be imported: {one_line(exc)}{hint}") from exc
    return AsyncLLM


def _prompt(token_ids: list[int]) -> Any:
    """A prompt of token ids: vLLM's rendered form where it has one (no tokenizer pass)."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:  # older vLLM
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=token_ids)
    return tokens_input(token_ids)


def _start_failed(exc: BaseException, log_file: Path, card: ModelCard) -> EngineError:
    """One line for a failed start: the root cause from vLLM's log when the exception only
    says "see above" (the engine core died in its own process)."""
    see_above = "see root cause" in str(exc).lower()
    cause = root_cause(log_file, LOG_WRAPPERS, EXCEPTION_LINE) if see_above else None
    message = cause or f"{type(exc).__name__}: {one_line(exc)}"
    lowered = message.lower()
    if "out of memory" in lowered or "insufficient memory" in lowered:
        message = f"out of memory: {message}"
    return EngineError(f"vllm could not load {card.path}: {message} (vLLM's log: {log_file})")


class VllmEngine(Engine):
    """Token-level engine over vLLM's AsyncLLM (continuous batching, prefix caching)."""

    def __init__(
        self,
        llm: Any,
        kv_block_size: int,
        snapshot: SchedulerSnapshot,
        log_file: Path,
        kv_endpoints: tuple[str, str] | None,
    ) -> None:
        self.llm = llm
        self.log_file = log_file
        self.snapshot = snapshot
        vllm_config = llm.vllm_config
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.max_num_seqs = int(vllm_config.scheduler_config.max_num_seqs)
        self.vllm_block_size = int(vllm_config.cache_config.block_size)
        self.num_kv_blocks = int(vllm_config.cache_config.num_gpu_blocks or 0)
        self._active = 0  # generate() calls running
        self._closed = False
        self._ipc_files = [e.removeprefix("ipc://") for e in kv_endpoints or ()]
        self.kv = KvEventMapper(kv_block_size)
        self.subscriber: KvEventSubscriber | None = None
        sources = {}
        with contextlib.suppress(Exception):
            sources = llm.get_kv_event_sources()
        events = next(iter(sources.values()), None) if sources else None
        if events is not None and events.publisher == "zmq" and events.enable_kv_cache_events:
            self.subscriber = KvEventSubscriber(events.endpoint, events.replay_endpoint, self.kv)

    # --- start ---------------------------------------------------------------------------
    @classmethod
    def start(cls, card: ModelCard, config: EngineConfig) -> VllmEngine:
        """Check the model and arguments, then start vLLM (its engine core process loads
        the model). Every failure is an EngineError with one line."""
        if card.kind != "hf":
            raise EngineError(
                f"'{card.path}' is a GGUF file; vLLM runs Hugging Face models (a folder or a "
                "repo id): use out=llamacpp for GGUF files"
            )
        reason = unusable_reason()
        if reason:
            raise EngineError(reason)
        build = installed_build()
        cpu = build is not None and device_of(build) == "cpu"
        block_size = config.kv_cache_block_size or DEFAULT_BLOCK_SIZE
        verbosity = max(config.verbosity, 0)  # -v / -vv / DYN_LOG; errors-only logs as 0
        log_file = configure_vllm_logging(verbosity)
        from dynamo_run_vllm.args import build_engine_args, kv_endpoints

        endpoints = kv_endpoints()
        snapshot = SchedulerSnapshot()
        try:
            with stderr_to(log_file, enabled=verbosity == 0), own_process_group():
                async_llm = _import_vllm()
                args = build_engine_args(card, config, *endpoints, cpu=cpu)
                llm = async_llm.from_engine_args(args, stat_loggers=[stat_logger_factory(snapshot)])
        except EngineError:
            raise
        except Exception as exc:
            raise _start_failed(exc, log_file, card) from exc
        engine = cls(llm, block_size, snapshot, log_file, endpoints)
        del llm  # only the engine holds it, so that close() can let it go
        log.info(
            "vllm: %s, max_model_len %d, %d KV blocks of %d tokens, max_num_seqs %d (log: %s)",
            card.path,
            engine.max_model_len,
            engine.num_kv_blocks,
            engine.vllm_block_size,
            engine.max_num_seqs,
            log_file,
        )
        return engine

    # --- what the frontend and workers read -----------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests vLLM is still tracking (an aborted one leaves at once), or that are
        on their way to it."""
        if self.llm is None:
            return 0
        return max(self._active, self.llm.get_num_unfinished_requests())

    def capabilities(self) -> EngineCapabilities:
        """Structured outputs (xgrammar / guidance) enforce both JSON formats; KV events
        when its engine core publishes them to us (not to a kv_events_config of the
        user's); the frontend checks prompts against max_model_len."""
        return EngineCapabilities(
            json_object=True,
            json_schema=True,
            kv_events=self.subscriber is not None,
            max_concurrency=self.max_num_seqs,
            context_per_sequence=self.max_model_len,
        )

    @property
    def kv_block_size(self) -> int:
        """Tokens per block in our KV events (vLLM's own blocks are a multiple)."""
        return self.kv.block_size

    def load(self) -> EngineLoad:
        """Live load for discovery: our requests in flight, and vLLM's scheduler numbers
        after its latest step (running sequences, KV cache usage)."""
        snap = self.snapshot
        return EngineLoad(
            in_flight=self.in_flight,
            slots_total=self.max_num_seqs,
            slots_busy=min(snap.running, self.max_num_seqs),
            kv_blocks_total=self.num_kv_blocks,
            kv_blocks_used=round(snap.kv_usage * self.num_kv_blocks),
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Report vLLM's KV events to ``sink`` (called on the subscriber thread)."""
        if self.subscriber is None and sink is not None:
            log.warning("vllm: KV events are disabled (kv_events_config); not reported")
        self.kv.set_sink(sink)

    # --- requests -------------------------------------------------------------------------
    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._closed:
            raise EngineError("vllm: the engine is closed")
        try:
            params = sampling_params(request)
        except Exception as exc:  # vLLM validates values (e.g. top_p out of range)
            yield EngineOutput(finish_reason=FINISH_ERROR, error=f"vllm: {one_line(exc)}")
            return
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        stream = self.llm.generate(_prompt(list(request.token_ids)), params, request_id)
        self._active += 1
        first = True
        finished = False
        try:
            async for out in stream:
                completion = out.outputs[0]
                reason = completion.finish_reason
                finished = out.finished
                item = EngineOutput(
                    token_ids=list(completion.token_ids),
                    logprobs=token_logprobs(
                        list(completion.token_ids), completion.logprobs, request.logprobs or 0
                    )
                    if request.logprobs is not None
                    else None,
                    finish_reason=(
                        FINISH_REASONS.get(str(reason), FINISH_ERROR) if finished else None
                    ),
                )
                if first:
                    item.cached_tokens = out.num_cached_tokens or 0
                    first = False
                if finished and item.finish_reason == FINISH_ERROR:
                    item.error = f"vllm: the request failed ({reason})"
                yield item
                if finished:
                    return
            if not finished:  # the stream ended without a finished output: aborted
                finished = True
                yield EngineOutput(finish_reason=FINISH_CANCELLED)
        except Exception as exc:  # not cancellation (BaseException): that aborts, below
            finished = True
            cause = exc.__cause__ or exc
            yield EngineOutput(finish_reason=FINISH_ERROR, error=f"vllm: {one_line(cause)}")
        finally:
            self._active -= 1
            if not finished:
                # Closing vLLM's generator aborts the request in the engine core, freeing
                # its sequence and KV blocks.
                with contextlib.suppress(Exception):
                    await stream.aclose()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.subscriber is not None:
            self.kv.set_sink(None)
            await asyncio.to_thread(self.subscriber.close)
        await asyncio.to_thread(self.llm.shutdown)
        # Let AsyncLLM go now: its __del__ shuts down again, which fails with a message
        # when it runs during interpreter teardown.
        self.llm = None
        gc.collect()
        for path in self._ipc_files:
            with contextlib.suppress(OSError):
                os.unlink(path)
