"""The llama.cpp engine: loads a GGUF model, runs the continuous-batching scheduler thread,
bridges each request's outputs into an async generator, and reports KV events (what its
slots and prompt cache hold, in blocks) to a sink when one is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import llama_cpp.llama_cpp as L

from dynamo_run.engine import Engine, EngineCapabilities, EngineError, KvEventSink
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE
from dynamo_run.model.card import ModelCard
from dynamo_run.protocol.internal import FINISH_ERROR, EngineLoad, EngineOutput, PreprocessedRequest
from dynamo_run_llamacpp.config import LlamaCppSettings
from dynamo_run_llamacpp.embeddings import Embedder
from dynamo_run_llamacpp.grammar import SchemaError, schema_grammar
from dynamo_run_llamacpp.native import context_params, init_backend, load_model, new_context
from dynamo_run_llamacpp.scheduler import Scheduler, Sequence

log = logging.getLogger("dynamo_run.llamacpp")


class LlamaCppEngine(Engine):
    """Token-level engine over llama.cpp with ``n_parallel`` concurrent sequences."""

    def __init__(
        self, card: ModelCard, settings: LlamaCppSettings, kv_block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        if card.kind != "gguf":
            raise EngineError(
                f"llamacpp: '{card.path}' is not a GGUF file; the llamacpp engine runs GGUF models"
            )
        if kv_block_size < 1:
            raise EngineError(f"llamacpp: the KV block size must be positive, got {kv_block_size}")
        self.settings = settings
        init_backend(settings.verbose)
        self.model = load_model(card.path, settings)
        try:
            self.ctx = new_context(self.model, context_params(settings))
        except EngineError:
            L.llama_model_free(self.model)
            raise
        vocab = L.llama_model_get_vocab(self.model)
        self.scheduler = Scheduler(
            self.ctx,
            vocab,
            settings.n_parallel,
            settings.n_batch,
            settings.seed,
            lockstep=bool(settings.lockstep),
            prompt_cache_bytes=settings.prompt_cache_mib << 20,
            threads=(settings.n_threads, settings.n_threads_batch),
            adaptive_threads=bool(settings.adaptive_threads),
            kv_block_size=kv_block_size,
        )
        self.embedder = Embedder(self.model, settings, min(self.scheduler.n_ctx_seq, 2048))
        self._closed = False

    def capabilities(self) -> EngineCapabilities:
        # response_format json_object / json_schema and forced tool calls are enforced with
        # GBNF grammars (grammar.py; schemas converted by llama-cpp-python's own converter).
        # n_ctx is split between the parallel sequences: each holds n_ctx_seq tokens.
        return EngineCapabilities(
            embeddings=True,
            json_object=True,
            json_schema=True,
            kv_events=True,
            max_concurrency=len(self.scheduler.slots),
            context_per_sequence=self.scheduler.n_ctx_seq,
        )

    @property
    def in_flight(self) -> int:
        """Requests waiting for or holding a sequence slot."""
        return self.scheduler.pending + len(self.scheduler.active)

    def load(self) -> EngineLoad:
        """Requests in flight and the sequence slots in use (a snapshot read off the
        scheduler thread; llama.cpp's cache is per token, so no KV block counts)."""
        slots = self.scheduler.slots
        return EngineLoad(
            in_flight=self.in_flight,
            slots_total=len(slots),
            slots_busy=sum(1 for slot in slots if slot.seq is not None),
        )

    @property
    def kv_block_size(self) -> int:
        """Tokens per block in KV events (llama.cpp's own cache is per token)."""
        return self.scheduler.kv_block_size

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Report KV events to ``sink`` (None: stop). Takes effect on the scheduler thread
        before the next request is admitted: a new sink first gets ``stored`` for what the
        engine holds then, a replaced one ``cleared``. The sink is called on the scheduler
        thread. Without a sink the engine computes no block hashes at all."""
        if self._closed:
            return
        with contextlib.suppress(EngineError):  # closed meanwhile: it holds nothing
            self.scheduler.call(lambda: self.scheduler.set_kv_sink(sink))

    def stats(self) -> dict[str, Any]:
        """Counters and per-slot cache sizes; ``overhead_ms_per_step`` is the time a step
        spends outside ``llama_decode`` (batch building, sampling, hand-off)."""
        s = self.scheduler
        c = dict(s.counters)
        steps = max(1, c["steps"])
        c["overhead_ms_per_step"] = 1000.0 * (c["step_s"] - c["decode_s"]) / steps
        c["decode_ms_per_step"] = 1000.0 * c["decode_s"] / steps
        c["handoff_ms_per_step"] = 1000.0 * c["handoff_wait_s"] / steps
        c["loop_ms_per_step"] = 1000.0 * c["loop_s"] / steps
        c.update(
            active=len(s.active),
            pending=s.pending,
            n_parallel=len(s.slots),
            context_per_sequence=s.n_ctx_seq,
            cached_per_slot=[slot.n for slot in s.slots],
            busy_slots=sum(1 for slot in s.slots if slot.seq is not None),
            threads_now=s.guard.current if s.guard else max(s.threads),
            thread_switches=s.guard.switches if s.guard else 0,
            prompt_cache_entries=len(s.prompt_cache or ()),
            prompt_cache_mib=round((s.prompt_cache.size if s.prompt_cache else 0) / 2**20, 1),
            kv_blocks_held=len(kv.refs) if (kv := s.kv) is not None else None,
            grammar_first_choice_ok=s._picker.argmax_ok,
            grammar_full_passes=s._picker.full_pass,
            decode_only_ms={
                n: (steps, round(1000.0 * secs / steps, 3))
                for n, (steps, secs) in sorted(s.decode_only.items())
            },
        )
        return c

    def summary(self) -> str:
        """One line of the counters that explain throughput (logged at close, -v)."""
        c = self.stats()
        steps = max(1, c["steps"])
        return (
            f"{c['steps']} steps, {c['generated_tokens']} tokens generated "
            f"({c['generated_tokens'] / steps:.2f}/step), {c['prefilled_tokens']} prefilled, "
            f"{c['cached_tokens']} from cache ({c['restored_tokens']} restored from "
            f"{c['prompt_cache_entries']} saved prompts, {c['prompt_cache_mib']} MiB); per step: {c['loop_ms_per_step']:.2f} ms, of which "
            f"decode {c['decode_ms_per_step']:.2f} ms, "
            f"scheduler {c['overhead_ms_per_step']:.3f} ms, "
            f"waiting for the frontend {c['handoff_ms_per_step']:.3f} ms "
            f"({c['handoff_timeouts']} timeouts); decode-only steps by batch size "
            f"(steps, ms): {c['decode_only_ms']}; threads {self.settings.n_threads}/"
            f"{self.settings.n_threads_batch} ({c['threads_now']} at the end, "
            f"{c['thread_switches']} changes), lockstep {self.settings.lockstep}"
        )

    def check_json_schema(self, schema: dict[str, Any]) -> str | None:
        """Why ``schema`` cannot be enforced, or None (the frontend answers 400 with it)."""
        try:
            schema_grammar(schema)
        except SchemaError as exc:
            return str(exc)
        return None

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._closed:
            raise EngineError("llamacpp: the engine is closed")
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        seq = Sequence(request, asyncio.get_running_loop(), queue)
        if request.sampling.json_schema is not None:
            try:
                seq.grammar = schema_grammar(request.sampling.json_schema)
            except SchemaError as exc:
                yield EngineOutput(
                    finish_reason=FINISH_ERROR, error=f"llamacpp: the JSON schema: {exc}"
                )
                return
        self.scheduler.submit(seq)
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.scheduler.cancel(seq)

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """One L2-normalised, mean-pooled vector per tokenised input."""
        if self._closed:
            raise EngineError("llamacpp: the engine is closed")
        inputs = [list(ids) for ids in token_ids]
        return await asyncio.wrap_future(self.scheduler.call(lambda: self.embedder.embed(inputs)))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self.scheduler.stop)
        if self.scheduler.counters["steps"]:
            log.info("llamacpp: %s", self.summary())
        self.embedder.close()
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
