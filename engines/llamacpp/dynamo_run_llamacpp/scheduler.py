"""The continuous-batching loop: one thread owns the llama.cpp context and, every step,
decodes ONE batch holding the next token of every generating sequence plus a chunk of
prompt for sequences still prefilling, then samples a token for each sequence that needs
one and hands the outputs to the requests' asyncio queues.

Each parallel sequence id is a *slot* whose KV cache outlives the request that filled it,
so a new request is placed in the free slot sharing the longest prefix with its prompt
and only the rest of its prompt is decoded.

With a KV event sink set, every change to what the slots and the prompt cache hold is
reported in whole blocks (kv_events.py); without one, none of that runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import llama_cpp.llama_cpp as L
import numpy as np

from dynamo_run.engine import EngineError, KvEventSink
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE
from dynamo_run.protocol.internal import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    PreprocessedRequest,
    TokenLogprob,
)
from dynamo_run_llamacpp.kv_events import KvTracker
from dynamo_run_llamacpp.native import Batch
from dynamo_run_llamacpp.prompt_cache import PromptCache
from dynamo_run_llamacpp.sampling import (
    GuidedPicker,
    build_chain,
    grammar_for,
    needs_chain,
    new_grammar,
    token_logprob,
)
from dynamo_run_llamacpp.thread_guard import ThreadGuard

_NO_TOKEN = -1
HANDOFF_TIMEOUT_S = 0.05
# A slot's state goes to the prompt cache before a request overwrites this many tokens.
MIN_LOSS_TO_SAVE = 8


class Sequence:
    """One request while the scheduler holds it."""

    __slots__ = (
        "cached",
        "cancelled",
        "chain",
        "generated",
        "grammar",
        "guide",
        "loop",
        "max_tokens",
        "min_tokens",
        "n_fed",
        "n_logprobs",
        "next_token",
        "prompt",
        "queue",
        "request",
        "slot",
        "stop_arr",
        "stop_ids",
    )

    def __init__(
        self, request: PreprocessedRequest, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue
    ) -> None:
        self.request = request
        self.loop = loop
        self.queue = queue
        self.cancelled = False
        try:  # range-checked at admission, before the int32 copy is used
            self.prompt = np.asarray(request.token_ids, dtype=np.int64)
        except (OverflowError, TypeError, ValueError):
            self.prompt = np.array([-1], dtype=np.int64)
        self.slot: Slot | None = None
        self.chain: Any = None
        self.grammar: str | None = None  # GBNF of sampling.json_schema, set by the engine
        self.guide: Any = None  # the grammar sampler constraining the answer, if any
        self.n_fed = 0  # prompt tokens whose KV is in the slot
        self.next_token = _NO_TOKEN  # sampled token still to be decoded
        self.generated = 0
        self.cached = 0
        stop = request.stop
        self.stop_ids = frozenset() if stop.ignore_eos else frozenset(stop.stop_token_ids)
        self.stop_arr = np.fromiter(self.stop_ids, dtype=np.int64)
        self.max_tokens = stop.max_tokens
        self.min_tokens = stop.min_tokens
        self.n_logprobs = request.logprobs


class Slot:
    """A llama.cpp sequence id and the tokens whose KV it currently holds."""

    __slots__ = ("hashes", "n", "seq", "seq_id", "tokens")

    def __init__(self, seq_id: int, capacity: int) -> None:
        self.seq_id = seq_id
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.n = 0
        self.seq: Sequence | None = None
        # While KV events are reported: the chain of hashes of tokens[:n]'s full blocks.
        self.hashes: list[int] = []


class Handoff:
    """Lets the scheduler wait until every event loop it handed a step's outputs to has
    run the consumers of those outputs (detokenise, render, write to the socket).

    When llama.cpp's threads fill every core, frontend work that overlaps a decode step
    preempts one of ggml's threads while the others spin at the next barrier, so the
    step loses about twice the frontend's CPU time (and on a busy machine much more).
    Taking turns costs the frontend's time once."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._epoch = 0
        self._waiting = 0

    def expect(self, n_loops: int) -> int:
        with self._cond:
            self._epoch += 1
            self._waiting = n_loops
            return self._epoch

    def ack(self, epoch: int) -> None:
        """Called on an event loop thread once that loop's consumers have run."""
        with self._cond:
            if epoch == self._epoch:
                self._waiting -= 1
                if self._waiting <= 0:
                    self._cond.notify()

    def wait(self, timeout: float) -> bool:
        """True if every loop acknowledged within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting <= 0, timeout)


def _slot_order(seq: Sequence) -> int:
    return seq.slot.seq_id  # type: ignore[union-attr]


def _deliver(
    items: list[tuple[asyncio.Queue, EngineOutput]], handoff: Handoff | None, epoch: int
) -> None:
    for queue, out in items:
        queue.put_nowait(out)  # schedules the waiting consumers' wake-ups
    if handoff is not None:
        # Runs after those wake-ups: each consumer has taken its output and reached its
        # next ``await`` (normally the next ``queue.get()``) by then.
        asyncio.get_running_loop().call_soon(handoff.ack, epoch)


class Scheduler:
    """Owns the context from a dedicated thread; other threads only submit and cancel."""

    def __init__(
        self,
        ctx: L.llama_context_p,
        vocab: L.llama_vocab_p,
        n_parallel: int,
        n_batch: int,
        default_seed: int | None,
        lockstep: bool = False,
        prompt_cache_bytes: int = 0,
        threads: tuple[int, int] = (1, 1),
        adaptive_threads: bool = False,
        kv_block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.ctx = ctx
        self.vocab = vocab
        self.mem = L.llama_get_memory(ctx)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        # Per sequence: with a unified KV buffer llama.cpp would let one sequence take it
        # all; capping each at its share keeps every slot able to reach its limit.
        self.n_ctx_seq = L.llama_n_ctx(ctx) // n_parallel
        self.n_batch = n_batch
        self.default_seed = default_seed
        self.batch = Batch(n_batch, n_parallel)
        self.slots = [Slot(i, self.n_ctx_seq) for i in range(n_parallel)]
        self.active: list[Sequence] = []
        self._pending: deque[Sequence] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._out: list[tuple[Sequence, EngineOutput]] = []
        self._handoff = Handoff() if lockstep else None
        self.decode_only: dict[int, list] = {}  # batch size -> [steps, seconds in decode]
        self.threads = threads  # (n_threads, n_threads_batch) as configured
        self.guard = ThreadGuard(max(threads)) if adaptive_threads and max(threads) > 1 else None
        self._logit_views: dict[tuple[int | None, int], np.ndarray] = {}
        self.prompt_cache = PromptCache(ctx, prompt_cache_bytes) if prompt_cache_bytes else None
        self.kv_block_size = kv_block_size
        self.kv: KvTracker | None = None  # reports KV events while a sink is set
        self.counters = {
            "steps": 0,
            "decode_s": 0.0,
            "step_s": 0.0,
            "loop_s": 0.0,  # wall time of loop turns, waiting for work excluded
            "generated_tokens": 0,
            "prefilled_tokens": 0,
            "cached_tokens": 0,
            "restored_tokens": 0,  # of cached_tokens, those loaded from the prompt cache
            "requests": 0,
            "handoff_wait_s": 0.0,
            "handoff_timeouts": 0,
        }
        self._picker = GuidedPicker(self.n_vocab)
        self._thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    # --- called from other threads --------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._stopping:
                raise EngineError("llamacpp: the engine is closed")
            self._pending.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the scheduler thread between steps (it owns the backend)."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise EngineError("llamacpp: the engine is closed")
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # --- the scheduler thread ---------------------------------------------------------
    def set_kv_sink(self, sink: KvEventSink | None) -> None:
        """Report KV events to ``sink`` from now on (None: stop). A sink replaced is told
        ``cleared``; a new one first gets ``stored`` for everything held now. Runs on the
        scheduler thread (through :meth:`call`)."""
        old = self.kv
        if old is not None and old.sink is sink:
            return
        self.kv = None
        cache = self.prompt_cache
        if old is not None:
            old.clear()
            for slot in self.slots:
                slot.hashes = []
            if cache is not None:
                cache.kv = None
                for entry in cache.entries():
                    entry.hashes = []
        if sink is None:
            return
        kv = KvTracker(self.kv_block_size, sink)
        for slot in self.slots:
            slot.hashes = []
            kv.extend(slot.hashes, slot.tokens[: slot.n])
        if cache is not None:
            for entry in cache.entries():
                entry.hashes = kv.chain(entry.tokens)
                kv.hold(entry.hashes, None)
            cache.kv = kv
        self.kv = kv

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._jobs or self.active or self._stopping):
                    self._cond.wait()
                t_loop = time.perf_counter()
                if self._stopping:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            try:
                self._sweep_cancelled()
                self._admit_pending()
                if self.active:
                    self._step()
            except Exception as exc:  # keep serving: fail what was running, reset KV
                self._fail_all(f"llamacpp engine failure: {exc}")
            self._flush(wait=bool(self.active))
            self.counters["loop_s"] += time.perf_counter() - t_loop
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for _, future in jobs:
            future.cancel()
        for seq in [*self.active, *pending]:
            self._emit(seq, EngineOutput(finish_reason=FINISH_ERROR, error="the engine closed"))
            self._release(seq)
        self.active = []
        self._flush()
        if self.kv is not None:  # the context is about to be freed
            self.kv.clear()
            self.kv = None

    def _emit(self, seq: Sequence, out: EngineOutput) -> None:
        self._out.append((seq, out))

    def _flush(self, wait: bool = False) -> None:
        """Hand this step's outputs over with one wake-up per event loop; in lockstep mode
        and with another step to run (``wait``), let the loops consume them first."""
        if not self._out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, out in self._out:
            by_loop.setdefault(seq.loop, []).append((seq.queue, out))
        self._out = []
        handoff = self._handoff if wait else None
        epoch = handoff.expect(len(by_loop)) if handoff is not None else 0
        delivered = 0
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_deliver, items, handoff, epoch)
                delivered += 1
        # (A closed loop never answers: then do not wait this once.)
        if handoff is not None and delivered == len(by_loop):
            start = time.perf_counter()
            # A loop busy with something long (a huge prompt to tokenise) must not stall
            # every sequence: after HANDOFF_TIMEOUT_S the next step runs regardless.
            if not handoff.wait(HANDOFF_TIMEOUT_S):
                self.counters["handoff_timeouts"] += 1
            self.counters["handoff_wait_s"] += time.perf_counter() - start

    def _release(self, seq: Sequence) -> None:
        if seq.chain is not None:
            L.llama_sampler_free(seq.chain)
            seq.chain = None
        if seq.guide is not None:
            L.llama_sampler_free(seq.guide)
            seq.guide = None
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot = None

    def _sweep_cancelled(self) -> None:
        """Forget requests whose consumers went away, waiting or running."""
        with self._cond:
            if any(seq.cancelled for seq in self._pending):
                self._pending = deque(seq for seq in self._pending if not seq.cancelled)
        if any(seq.cancelled for seq in self.active):
            for seq in self.active:
                if seq.cancelled:
                    self._release(seq)
            self.active = [seq for seq in self.active if not seq.cancelled]

    def _fail(self, seq: Sequence, message: str) -> None:
        self._emit(seq, EngineOutput(finish_reason=FINISH_ERROR, error=message, cached_tokens=0))
        self._release(seq)

    def _fail_all(self, message: str) -> None:
        for seq in self.active:
            slot = seq.slot
            if slot is not None:  # its KV may be half-written: forget it
                L.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                slot.n = 0
                if self.kv is not None:
                    self.kv.truncate(slot.hashes, 0)
            self._fail(seq, message)
        self.active = []

    def _admit_pending(self) -> None:
        free = [slot for slot in self.slots if slot.seq is None]
        while free:
            with self._cond:
                if not self._pending:
                    return
                seq = self._pending.popleft()
            if seq.cancelled:
                continue
            if self._admit(seq, free):
                free = [slot for slot in free if slot.seq is None]

    def _admit(self, seq: Sequence, free: list[Slot]) -> bool:
        """Place ``seq`` in the best free slot; False if it finished without one."""
        self.counters["requests"] += 1
        prompt = seq.prompt
        n = len(prompt)
        if n == 0:
            self._fail(seq, "the prompt is empty")
            return False
        if n > self.n_ctx_seq:
            self._fail(
                seq,
                f"the prompt has {n} tokens but this engine's context per sequence is "
                f"{self.n_ctx_seq} tokens",
            )
            return False
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.n_vocab:
            self._fail(seq, f"a prompt token id is outside the vocabulary (0..{self.n_vocab - 1})")
            return False
        seq.prompt = prompt = prompt.astype(np.int32)
        if seq.max_tokens is not None and seq.max_tokens <= 0:
            self._emit(seq, EngineOutput(finish_reason=FINISH_LENGTH, cached_tokens=0))
            return False
        opts = seq.request.sampling
        try:
            if needs_chain(opts):
                seq.chain = build_chain(
                    opts, self.vocab, self.n_vocab, self.n_ctx_seq, self.default_seed
                )
            gbnf = grammar_for(opts, seq.grammar)
            if gbnf is not None:
                seq.guide = new_grammar(self.vocab, gbnf)
        except EngineError as exc:
            self._fail(seq, str(exc))
            return False

        slot, common = self._best_slot(prompt, free)
        common = self._use_prompt_cache(slot, prompt, common)
        common = min(common, n - 1)  # always decode the last prompt token for its logits
        if common < slot.n and not L.llama_memory_seq_rm(self.mem, slot.seq_id, common, -1):
            L.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)  # cannot cut: drop it all
            common = 0
        slot.n = common
        if self.kv is not None:  # the blocks past the common prefix are gone from the slot
            self.kv.truncate(slot.hashes, common)
        slot.seq = seq
        seq.slot = slot
        seq.n_fed = common
        seq.cached = common
        self.counters["cached_tokens"] += common
        self.active.append(seq)
        return True

    def _use_prompt_cache(self, slot: Slot, prompt: np.ndarray, common: int) -> int:
        """Save what ``slot`` is about to lose, then load a cached state into it if one
        covers more of ``prompt``; returns how much of ``prompt`` the slot now holds."""
        cache = self.prompt_cache
        if cache is None:
            return common
        kv = self.kv
        if slot.n - common >= MIN_LOSS_TO_SAVE:
            cache.save(slot.seq_id, slot.tokens[: slot.n], slot.hashes if kv is not None else None)
        hit = cache.best(prompt, common)
        if hit is None:
            return common
        key, shared = hit
        L.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        entry = cache.restore(key, slot.seq_id)
        if entry is None:
            slot.n = 0
            if kv is not None:
                kv.truncate(slot.hashes, 0)
            return 0
        tokens = entry.tokens
        slot.tokens[: len(tokens)] = tokens
        slot.n = len(tokens)
        if kv is not None:
            kv.replace(slot.hashes, entry.hashes)
        self.counters["restored_tokens"] += min(shared, len(prompt) - 1)
        return shared

    @staticmethod
    def _best_slot(prompt: np.ndarray, free: list[Slot]) -> tuple[Slot, int]:
        """The free slot sharing the longest prefix with ``prompt``; the lowest id among
        equals, so that busy slots stay a run of consecutive ids, which llama.cpp decodes
        as one batch (see _step). What a request overwrites goes to the prompt cache."""
        best, best_common = free[0], -1
        for slot in free:
            m = min(slot.n, len(prompt))
            common = 0
            if m:
                same = slot.tokens[:m] == prompt[:m]
                common = m if same.all() else int(same.argmin())
            if common > best_common:  # ``free`` is in id order
                best, best_common = slot, common
        return best, best_common

    def _step(self) -> None:
        t_start = time.perf_counter()
        batch = self.batch
        tokens, pos, logits, seq_col, addr = (
            batch.tokens,
            batch.pos,
            batch.logits,
            batch.seq,
            batch.seq_addr,
        )
        # Plan: every generating sequence decodes its next token; the rest of the batch
        # goes to prompts still prefilling, first come (self.active's order) first served.
        budget = self.n_batch - sum(1 for seq in self.active if seq.next_token != _NO_TOKEN)
        chunk_of: dict[int, int] = {}  # id(seq) -> prompt tokens it decodes in this step
        for seq in self.active:
            if budget <= 0:
                break
            if seq.next_token == _NO_TOKEN:
                k = min(len(seq.prompt) - seq.n_fed, budget)
                chunk_of[id(seq)] = k
                budget -= k
        # Write the batch in sequence-id order (admission order drifts from it as requests
        # come and go): with one KV buffer per sequence (kv_unified false) llama.cpp splits
        # a batch into runs of ascending consecutive ids and computes each run apart, so
        # four sequences in reverse order cost four steps of one (bench_engine_step.py
        # decode with "shuffled"). The unified buffer does not care; sorting costs ~1 us.
        outputs: list[tuple[Sequence, int]] = []
        decoded: list[Sequence] = []
        chunks: list[tuple[Sequence, int, int]] = []
        n = 0
        for seq in sorted(self.active, key=_slot_order):
            slot = seq.slot
            if seq.next_token != _NO_TOKEN:
                tokens[n] = seq.next_token
                pos[n] = slot.n
                seq_col[n] = addr[slot.seq_id]
                logits[n] = 1
                outputs.append((seq, n))
                decoded.append(seq)
                n += 1
                continue
            k = chunk_of.get(id(seq), 0)
            if not k:
                continue
            start = seq.n_fed
            end = n + k
            tokens[n:end] = seq.prompt[start : start + k]
            pos[n:end] = np.arange(start, start + k, dtype=np.int32)
            seq_col[n:end] = addr[slot.seq_id]
            logits[n:end] = 0
            if start + k == len(seq.prompt):
                logits[end - 1] = 1
                outputs.append((seq, end - 1))
            chunks.append((seq, start, k))
            n = end
        decoding = len(decoded)

        t_decode = time.perf_counter()
        rc = batch.decode(self.ctx, n)
        t_decoded = time.perf_counter()
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc}")

        kv = self.kv
        for seq in decoded:
            slot = seq.slot
            slot.tokens[slot.n] = seq.next_token
            slot.n += 1
            if kv is not None and slot.n % kv.block_size == 0:  # a block is complete
                kv.extend(slot.hashes, slot.tokens[: slot.n])
        for seq, start, k in chunks:
            slot = seq.slot
            slot.tokens[start : start + k] = seq.prompt[start : start + k]
            slot.n = start + k
            seq.n_fed = start + k
            self.counters["prefilled_tokens"] += k
            if kv is not None:
                kv.extend(slot.hashes, slot.tokens[: slot.n])

        if outputs:
            self._sample(outputs)

        t_end = time.perf_counter()
        c = self.counters
        c["steps"] += 1
        c["decode_s"] += t_decoded - t_decode
        c["step_s"] += t_end - t_start
        if not chunks:  # decode-only steps, by how many sequences they carried
            count_time = self.decode_only.setdefault(decoding, [0, 0.0])
            count_time[0] += 1
            count_time[1] += t_decoded - t_decode
            if self.guard is not None:
                threads = self.guard.observe(decoding, t_decoded - t_decode)
                if threads is not None:
                    n_threads, n_batch = self.threads
                    L.llama_set_n_threads(self.ctx, min(n_threads, threads), min(n_batch, threads))

    def _logits(self, n_rows: int) -> np.ndarray:
        """This step's logits rows as a numpy view (views are reused while llama.cpp keeps
        its output buffer in place: making one costs more than the argmax)."""
        ptr = L.llama_get_logits(self.ctx)
        key = (ctypes.cast(ptr, ctypes.c_void_p).value, n_rows)
        view = self._logit_views.get(key)
        if view is None:
            if len(self._logit_views) >= 64:
                self._logit_views.clear()
            view = self._logit_views[key] = np.ctypeslib.as_array(ptr, (n_rows, self.n_vocab))
        return view

    def _sample(self, outputs: list[tuple[Sequence, int]]) -> None:
        rows = self._logits(len(outputs))
        greedy: list[int] | None = None  # every row's argmax, computed at most once
        finished = False
        for j, (seq, index) in enumerate(outputs):
            row = rows[j]
            masked = seq.generated < seq.min_tokens and seq.stop_arr.size
            if masked:
                row[seq.stop_arr] = -np.inf
            if seq.guide is not None:
                token = self._picker.pick(row, seq.chain, seq.guide)
            elif seq.chain is not None:
                token = L.llama_sampler_sample(seq.chain, self.ctx, index)
            elif masked:
                token = int(row.argmax())
            else:
                if greedy is None:
                    greedy = rows.argmax(axis=1).tolist()
                token = greedy[j]
            lp: list[TokenLogprob] | None = None
            if seq.n_logprobs is not None:
                lp = [token_logprob(row, token, seq.n_logprobs)]
            seq.generated += 1
            finish = None
            if token in seq.stop_ids:
                finish = FINISH_STOP
            elif seq.guide is not None and seq.stop_ids and L.llama_vocab_is_eog(self.vocab, token):
                # A finished grammar allows only end-of-generation tokens, and the model may
                # pick one the request does not list (<|endoftext|> beside <|im_end|>).
                finish = FINISH_STOP
            elif (seq.max_tokens is not None and seq.generated >= seq.max_tokens) or (
                seq.slot.n >= self.n_ctx_seq
            ):
                finish = FINISH_LENGTH
            out = EngineOutput(token_ids=[token], finish_reason=finish, logprobs=lp)
            if seq.generated == 1:
                out.cached_tokens = seq.cached
            self._emit(seq, out)
            if finish is None:
                seq.next_token = token
            else:
                finished = True
                seq.cancelled = True  # done: the filter below drops it from the active list
                self._release(seq)
        self.counters["generated_tokens"] += len(outputs)
        if finished:
            self.active = [seq for seq in self.active if not seq.cancelled]
