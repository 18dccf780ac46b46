"""The SGLang engine: SGLang's offline ``Engine`` (its scheduler and detokenizer run in
subprocesses; the tokenizer manager runs on our event loop), driven with token ids.

Cancellation: when the consumer closes our stream, the request is aborted by its rid
(``tokenizer_manager.abort_request``) and SGLang's stream is closed, which frees the
request's state and KV slots in the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from dynamo_run.engine import Engine, EngineCapabilities, EngineConfig, EngineError, KvEventSink
from dynamo_run.engine_support.errors import load_error, short, unknown_argument_error
from dynamo_run.engine_support.startup_log import log_path, root_cause, stderr_to
from dynamo_run.model.card import ModelCard
from dynamo_run.protocol.internal import (
    FINISH_ERROR,
    FINISH_STOP,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
)
from dynamo_run_sglang import install
from dynamo_run_sglang.config import NAME, check_model, engine_kwargs, page_size, publishes_to
from dynamo_run_sglang.kv_events import KvEventTranslator, ZmqKvSubscriber
from dynamo_run_sglang.launch import (
    LOG_WRAPPERS,
    on_child_failure,
    sigquit_ignored_off_main_thread,
)
from dynamo_run_sglang.sampling import generate_kwargs, new_rid
from dynamo_run_sglang.stream import OutputStream

log = logging.getLogger("dynamo_run.sglang")

LOAD_POLL_S = 1.0


def _start_sglang(kwargs: dict[str, Any]) -> Any:
    """Validate the arguments with SGLang's ``ServerArgs`` (a typo is reported before any
    GPU work), then launch ``sglang.Engine``."""
    try:
        import sglang
        from sglang.srt.server_args import ServerArgs
    except ImportError as exc:
        raise EngineError(
            f"{NAME}: sglang cannot be imported ({short(exc)}): pip install 'dynamo-run[sglang]'"
        ) from exc
    kwargs = {"custom_sigquit_handler": on_child_failure, **kwargs}
    try:
        server_args = ServerArgs(**kwargs)
    except TypeError as exc:
        known = inspect.signature(ServerArgs).parameters
        raise unknown_argument_error(NAME, exc, known) from exc
    return sglang.Engine(server_args=server_args)


class SGLangEngine(Engine):
    """Token-level engine over one ``sglang.Engine``."""

    def __init__(
        self,
        sgl: Any,
        *,
        incremental: bool = False,
        block_size: int = 16,
        kv: KvEventTranslator | None = None,
        subscriber: ZmqKvSubscriber | None = None,
    ) -> None:
        self.sgl = sgl
        self.incremental = incremental
        self.block_size = block_size
        self.kv = kv
        self._subscriber = subscriber
        self._in_flight = 0
        self._closed = False
        self._load: dict[str, int] = {}
        self._poller: asyncio.Task[None] | None = None
        infos = getattr(getattr(sgl, "_scheduler_init_result", None), "scheduler_infos", None)
        if infos:
            self._load["kv_tokens_total"] = int(infos[0].get("max_total_num_tokens") or 0)

    @classmethod
    def start(cls, card: ModelCard, config: EngineConfig) -> SGLangEngine:
        """Check everything that can be checked cheaply, then launch SGLang."""
        check_model(card)
        engine_kwargs(card, config)  # our flags' errors before the machine's
        reason = install.unusable_reason()
        if reason is not None:
            raise EngineError(reason)  # names the engine already
        translator = KvEventTranslator(16)
        subscriber: ZmqKvSubscriber | None = ZmqKvSubscriber(translator)
        try:
            kwargs = engine_kwargs(card, config, subscriber.endpoint)
            translator.block_size = page_size(kwargs)
            if not publishes_to(kwargs, subscriber.endpoint):
                subscriber.close()
                subscriber = None
            log_file = log_path(NAME)
            try:
                with stderr_to(log_file), sigquit_ignored_off_main_thread():
                    sgl = _start_sglang(kwargs)
            except EngineError:
                raise
            except (Exception, SystemExit) as exc:
                cause = root_cause(log_file, LOG_WRAPPERS)
                raise load_error(NAME, str(card.path), exc, cause, log_file) from exc
        except BaseException:
            if subscriber is not None:
                subscriber.close()
            raise
        return cls(
            sgl,
            incremental=bool(kwargs.get("incremental_streaming_output", False)),
            block_size=translator.block_size,
            kv=translator if subscriber is not None else None,
            subscriber=subscriber,
        )

    def capabilities(self) -> EngineCapabilities:
        """response_format json_object / json_schema go to SGLang's grammar backend; KV
        events when SGLang publishes them to our subscriber (not to the user's own
        kv_events_config)."""
        return EngineCapabilities(json_object=True, json_schema=True, kv_events=self.kv is not None)

    # --- requests -------------------------------------------------------------------------
    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._closed:
            raise EngineError(f"{NAME}: the engine is closed")
        self._ensure_loop()
        rid = new_rid(request)
        stream = OutputStream(self.incremental, request.logprobs is not None)
        self._in_flight += 1
        chunks: AsyncIterator[dict[str, Any]] | None = None
        finished = False
        try:
            try:
                chunks = await self.sgl.async_generate(**generate_kwargs(request, rid))
                async for chunk in chunks:
                    stream.aborted = self._closed  # close() aborts what is in flight
                    out = stream.step(chunk)
                    finished = out.finish_reason is not None
                    if out.token_ids or finished or out.cached_tokens is not None:
                        yield out
                    if finished:
                        return
            except Exception as exc:
                # SGLang rejects bad requests (too long a prompt, a schema its grammar
                # backend cannot compile) by raising from the stream: one error line.
                finished = True
                yield EngineOutput(finish_reason=FINISH_ERROR, error=f"{NAME}: {short(exc)}")
                return
            finished = True
            yield EngineOutput(finish_reason=FINISH_STOP)
        finally:
            self._in_flight -= 1
            if not finished:  # the consumer went away
                self._abort(rid)
            if chunks is not None:
                with contextlib.suppress(Exception):
                    await chunks.aclose()  # type: ignore[attr-defined]

    def _abort(self, rid: str) -> None:
        """Tell SGLang's scheduler to drop the request and free its KV."""
        try:
            self.sgl.tokenizer_manager.abort_request(rid=rid)
        except Exception:  # shutting down: nothing left to free
            log.debug("sglang: abort of %s failed", rid, exc_info=True)

    # --- load and KV events ---------------------------------------------------------------
    def load(self) -> EngineLoad:
        """Our requests in flight, and SGLang's own load snapshot (running requests, KV
        tokens used and total, in blocks of ``page_size``) polled once a second."""
        bs = self.block_size
        return EngineLoad(
            in_flight=self._in_flight,
            slots_total=self._load.get("max_running_requests", 0),
            slots_busy=self._load.get("num_running_reqs", 0),
            kv_blocks_total=self._load.get("kv_tokens_total", 0) // bs,
            kv_blocks_used=self._load.get("kv_tokens_used", 0) // bs,
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Forward SGLang's KV events, re-hashed as ours, to ``sink`` (called on the
        subscriber thread). Without a publisher (the user gave their own
        ``kv_events_config``) there is nothing to forward."""
        if self.kv is None:
            if sink is not None:
                log.warning("sglang: KV events go to the user's kv_events_config, not the router")
            return
        self.kv.set_sink(sink)

    def _ensure_loop(self) -> None:
        """On the first request: start SGLang's tokenizer-manager loop on ours, keeping
        the process's SIGTERM handling (SGLang would take SIGTERM over to drain and kill
        its process tree, bypassing dynamo-run's shutdown), and the load poller."""
        tm = getattr(self.sgl, "tokenizer_manager", None)
        start = getattr(tm, "auto_create_handle_loop", None)
        if callable(start) and getattr(tm, "event_loop", False) is None:
            on_main = threading.current_thread() is threading.main_thread()
            saved = signal.getsignal(signal.SIGTERM) if on_main else None
            start()
            if on_main:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
                signal.signal(signal.SIGTERM, saved if saved is not None else signal.SIG_DFL)
        if self._poller is None and hasattr(tm, "get_loads"):
            self._poller = asyncio.get_running_loop().create_task(self._poll_load(tm))

    async def _poll_load(self, tm: Any) -> None:
        while not self._closed:
            try:
                snapshots = await tm.get_loads()
            except Exception:
                log.debug("sglang: no load snapshot; load() reports our own counts only")
                return
            if snapshots:
                self._load.update(
                    num_running_reqs=sum(s.num_running_reqs for s in snapshots),
                    max_running_requests=sum(s.max_running_requests for s in snapshots),
                    kv_tokens_used=sum(s.num_used_tokens for s in snapshots),
                    kv_tokens_total=sum(s.max_total_num_tokens for s in snapshots)
                    or self._load.get("kv_tokens_total", 0),
                )
            await asyncio.sleep(LOAD_POLL_S)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.sgl.shutdown)
        if self._subscriber is not None:
            self._subscriber.close()
