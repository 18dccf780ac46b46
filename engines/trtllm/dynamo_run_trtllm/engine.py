"""The TensorRT-LLM engine: one ``tensorrt_llm.LLM`` (PyTorch backend; its executor runs
in worker processes), driven with token ids.

Cancellation: when the consumer closes our stream, ``abort()`` on the request's result
tells the executor to drop it and free its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from dynamo_run.engine import Engine, EngineCapabilities, EngineConfig, EngineError, KvEventSink
from dynamo_run.engine_support.errors import load_error, short
from dynamo_run.engine_support.startup_log import log_path, root_cause, stderr_to
from dynamo_run.model.card import ModelCard
from dynamo_run.protocol.internal import (
    FINISH_ERROR,
    FINISH_STOP,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
)
from dynamo_run_trtllm import install
from dynamo_run_trtllm.config import NAME, block_size, check_model, context_length, llm_kwargs
from dynamo_run_trtllm.kv_events import KvEventTranslator
from dynamo_run_trtllm.sampling import sampling_kwargs
from dynamo_run_trtllm.stream import OutputStream

log = logging.getLogger("dynamo_run.trtllm")

POLL_TIMEOUT_S = 1.0  # how long one stats / KV events poll waits for news
# TensorRT-LLM's messages that point at the real error in its log rather than say it. Its
# workers (MPI or multiprocessing) keep the log as their stderr while the LLM starts.
LOG_WRAPPERS = ("Executor creation failed", "Failed to parse the arguments", "See above")

SamplingFactory = Callable[[dict[str, Any]], Any]


def _import_api() -> tuple[Any, Any, SamplingFactory]:
    """(LLM, KvCacheConfig, a SamplingParams factory) from tensorrt_llm."""
    try:
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
        from tensorrt_llm.sampling_params import GuidedDecodingParams
    except ImportError as exc:
        raise EngineError(
            f"{NAME}: tensorrt_llm cannot be imported ({short(exc)}): "
            "pip install 'dynamo-run[trtllm]'"
        ) from exc

    def make(kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        guide = kwargs.pop("guided_decoding", None)
        if guide is not None:
            kwargs["guided_decoding"] = GuidedDecodingParams(**guide)
        return SamplingParams(**kwargs)

    return LLM, KvCacheConfig, make


class TrtLlmEngine(Engine):
    """Token-level engine over one ``tensorrt_llm.LLM``."""

    def __init__(
        self,
        llm: Any,
        make_sampling_params: SamplingFactory,
        *,
        block_size: int = 32,
        context_length: int = 4096,
        kv: KvEventTranslator | None = None,
    ) -> None:
        self.llm = llm
        self.make_sampling_params = make_sampling_params
        self.block_size = block_size
        self.context_length = context_length
        self.kv = kv or KvEventTranslator(block_size)
        self._in_flight = 0
        self._closed = False
        self._stats: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def start(cls, card: ModelCard, config: EngineConfig) -> TrtLlmEngine:
        """Check everything that can be checked cheaply, then build the LLM."""
        check_model(card)
        kwargs = llm_kwargs(card, config)
        reason = install.unusable_reason()
        if reason is not None:
            raise EngineError(reason)  # names the engine already
        llm_cls, kv_config_cls, make = _import_api()
        try:
            kv_config = kv_config_cls(**kwargs["kv_cache_config"])
        except (TypeError, ValueError) as exc:
            raise EngineError(f"{NAME}: bad kv_cache_config: {short(exc)}") from exc
        log_file = log_path(NAME)
        try:
            with stderr_to(log_file):
                llm = llm_cls(**{**kwargs, "kv_cache_config": kv_config})
        except (Exception, SystemExit) as exc:
            cause = root_cause(log_file, LOG_WRAPPERS)
            raise load_error(NAME, str(card.path), exc, cause, log_file) from exc
        return cls(
            llm,
            make,
            block_size=block_size(kwargs),
            context_length=context_length(card, kwargs),
        )

    def capabilities(self) -> EngineCapabilities:
        """response_format json_object / json_schema go to xgrammar (guided_decoding_backend);
        its KV cache events are polled; sequences hold at most max_seq_len tokens."""
        return EngineCapabilities(
            json_object=True,
            json_schema=True,
            kv_events=True,
            context_per_sequence=self.context_length,
        )

    # --- requests -------------------------------------------------------------------------
    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._closed:
            raise EngineError(f"{NAME}: the engine is closed")
        self._start_pollers()
        try:
            params = self.make_sampling_params(sampling_kwargs(request, self.context_length))
        except (TypeError, ValueError) as exc:  # SamplingParams validates its values
            yield EngineOutput(finish_reason=FINISH_ERROR, error=f"{NAME}: {short(exc)}")
            return
        stream = OutputStream(len(request.token_ids), self.block_size, request.logprobs)
        self._in_flight += 1
        result: Any = None
        finished = False
        try:
            try:
                result = self.llm.generate_async(
                    list(request.token_ids), sampling_params=params, streaming=True
                )
                async for step in result:
                    out = stream.step(step)
                    finished = out.finish_reason is not None
                    if out.token_ids or finished or out.cached_tokens is not None:
                        yield out
                    if finished:
                        return
            except Exception as exc:
                # Requests the executor rejects (too long a prompt, a bad schema) raise.
                finished = True
                yield EngineOutput(finish_reason=FINISH_ERROR, error=f"{NAME}: {short(exc)}")
                return
            finished = True
            yield EngineOutput(finish_reason=FINISH_STOP)
        finally:
            self._in_flight -= 1
            if not finished and result is not None:  # the consumer went away
                try:
                    result.abort()
                except Exception:
                    log.debug("trtllm: abort failed", exc_info=True)

    # --- load and KV events ---------------------------------------------------------------
    def load(self) -> EngineLoad:
        """Our requests in flight, and the executor's latest iteration stats (active
        requests and their limit, KV blocks used and total)."""
        kv = self._stats.get("kvCacheStats") or {}
        return EngineLoad(
            in_flight=self._in_flight,
            slots_total=int(self._stats.get("maxNumActiveRequests") or 0),
            slots_busy=int(self._stats.get("numActiveRequests") or 0),
            kv_blocks_total=int(kv.get("maxNumBlocks") or 0),
            kv_blocks_used=int(kv.get("usedNumBlocks") or 0),
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Forward the LLM's KV events, re-hashed as ours, to ``sink`` (called on our
        event loop, from the poller)."""
        self.kv.set_sink(sink)
        self._start_pollers()

    def _start_pollers(self) -> None:
        if self._tasks or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first request instead
        self._tasks = [
            loop.create_task(self._poll(self.llm.get_stats_async, self._on_stats)),
            loop.create_task(self._poll(self.llm.get_kv_cache_events_async, self.kv.handle)),
        ]

    def _on_stats(self, stats: Any) -> None:
        if isinstance(stats, dict):
            self._stats = stats

    async def _poll(self, source: Callable[..., Any], handle: Callable[[Any], None]) -> None:
        """Drain ``source(timeout)`` (an async iterable that ends when nothing came for
        ``timeout`` seconds) for as long as the engine runs."""
        while not self._closed:
            got = 0
            try:
                async for item in source(POLL_TIMEOUT_S):
                    got += 1
                    handle(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("trtllm: polling %s failed; stopped", source, exc_info=True)
                return
            if not got:
                await asyncio.sleep(POLL_TIMEOUT_S / 4)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.llm.shutdown)
        self.kv.clear()
