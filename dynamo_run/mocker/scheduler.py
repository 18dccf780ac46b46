"""The mocker's scheduler: one asyncio task that steps every running sequence together.

Each step (continuous batching):

1. admit waiting requests, first come first served, while the batch has a free slot
   (``max_num_seqs``), the step's token budget (``max_num_batched_tokens``) allows, and the
   block pool can hold the whole sequence (prompt and every token it may generate) without
   going under the ``watermark``. A request reuses the longest cached prefix of full prompt
   blocks, at most up to the prompt's last token (one token is always computed, as real
   engines do), and its uncached prompt tokens are prefilled in this step;
2. wait the simulated step time: ``decode_ms_base + decode_ms_per_seq * batch +
   prefill_ms_per_token * prefilled tokens``, divided by ``speedup_ratio``;
3. give one token to every sequence in the batch, store the blocks that the step filled
   (a block is full once the KV of all its tokens is computed: the prompt, and each
   generated token but the newest), and finish the sequences that reached their limit.

Reserving a sequence's blocks up front means a running sequence never runs out of room, so
there is no preemption. A request that needs more blocks than the pool has fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

from dynamo_run.kv_blocks import block_hash, block_hashes
from dynamo_run.mocker.block_pool import BlockPool
from dynamo_run.mocker.config import MockerSettings
from dynamo_run.mocker.tokens import TokenSource
from dynamo_run.protocol.internal import (
    FINISH_ERROR,
    FINISH_LENGTH,
    EngineOutput,
    TokenLogprob,
)

log = logging.getLogger(__name__)

WAITING, RUNNING, DONE = "waiting", "running", "done"


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler. Outputs go to ``outbox``, in order."""

    request_id: str
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new: int
    block_size: int
    logprobs: int | None = None
    outbox: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    state: str = WAITING
    generated: int = 0
    cached_tokens: int = 0
    blocks: list[int] = field(default_factory=list)  # pinned cached blocks, chain order
    reserved: int = 0  # pool blocks reserved for the rest of the sequence
    source: TokenSource | None = None
    _prompt_blocks: list[int] | None = None

    @property
    def prompt_blocks(self) -> list[int]:
        """Chained hashes of the prompt's full blocks (computed once)."""
        if self._prompt_blocks is None:
            self._prompt_blocks = block_hashes(self.tokens[: self.prompt_len], self.block_size)
        return self._prompt_blocks

    @property
    def kv_len(self) -> int:
        """Tokens whose KV is computed after the last step: all but the newest token."""
        return self.prompt_len + max(0, self.generated - 1)

    @property
    def total_blocks(self) -> int:
        """Blocks the sequence occupies at its longest (its last token has no KV)."""
        return -(-(self.prompt_len + self.max_new - 1) // self.block_size)


class Scheduler:
    def __init__(self, settings: MockerSettings, pool: BlockPool, words: list[int]) -> None:
        self.settings = settings
        self.pool = pool
        self.words = words
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}  # insertion-ordered set
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------
    def _ensure_running(self) -> None:
        """Start the step loop on the running event loop (an engine is created off-loop)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done():
            if self._loop is loop:
                return
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("mocker: the engine is in use on another event loop")
        if self._loop is not loop:
            # A previous loop ended (asyncio.run per call): its requests ended with it.
            self._drop_all()
        self._loop = loop
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="mocker-scheduler")

    async def close(self) -> None:
        """Stop the loop, end every request with an error, empty the pool."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            if self._loop is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(task.cancel)
        self._fail_all("mocker: the engine was closed")
        self.pool.clear()

    # --- requests -----------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; it gets outputs (or an error) in its outbox."""
        if self._closed:
            self._finish(seq, EngineOutput(finish_reason=FINISH_ERROR, error="mocker: closed"))
            return
        if seq.total_blocks > self.pool.num_blocks:
            error = (
                f"mocker: the request needs {seq.total_blocks} KV blocks of "
                f"{self.pool.block_size} tokens ({seq.prompt_len} prompt + up to {seq.max_new} "
                f"generated), the pool has {self.pool.num_blocks} (num_gpu_blocks)"
            )
            self._finish(seq, EngineOutput(finish_reason=FINISH_ERROR, error=error))
            return
        self._ensure_running()
        self.waiting.append(seq)
        assert self._wake is not None
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """The consumer went away: leave the queue or batch now and unpin the blocks."""
        if seq.state == WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        elif seq.state == RUNNING:
            self.running.pop(seq, None)
            self._release(seq)
        seq.state = DONE

    # --- the step loop ------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                prefill = self._admit()
                if not self.running:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                delay = self.settings.step_seconds(len(self.running), prefill)
                await asyncio.sleep(max(0.0, started + delay - loop.time()))
                self._step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave requests hanging
            log.exception("mocker: scheduler failed")
            self._closed = True
            self._fail_all(f"mocker: scheduler failed: {exc}")

    def _admit(self) -> int:
        """Move waiting sequences into the batch; returns the prompt tokens to prefill."""
        s = self.settings
        budget = s.max_num_batched_tokens - len(self.running)
        prefill = 0
        admitted = 0
        while self.waiting and len(self.running) < s.max_num_seqs:
            seq = self.waiting[0]
            full = seq.prompt_blocks
            reusable = (seq.prompt_len - 1) // self.pool.block_size
            reuse = full[: self.pool.cached_prefix(full[:reusable])]
            new_tokens = seq.prompt_len - len(reuse) * self.pool.block_size
            if admitted and new_tokens > budget - prefill:
                break
            reserve = seq.total_blocks - len(reuse)
            if not self.pool.can_acquire(reuse, reserve):
                break
            grown = self.pool.used + self.pool.extra_used(reuse, reserve)
            if self.running and grown > (1.0 - s.watermark) * self.pool.num_blocks:
                break
            self.pool.acquire(reuse, reserve)
            self.waiting.popleft()
            seq.blocks = list(reuse)
            seq.reserved = reserve
            seq.cached_tokens = len(reuse) * self.pool.block_size
            seq.source = TokenSource(self.words, seq.tokens[: seq.prompt_len])
            seq.state = RUNNING
            self.running[seq] = None
            prefill += new_tokens
            admitted += 1
        return prefill

    def _step(self) -> None:
        """One token for every sequence in the batch."""
        for seq in list(self.running):
            assert seq.source is not None
            token = seq.source.next_token()
            seq.tokens.append(token)
            seq.generated += 1
            self._store_full_blocks(seq)
            out = EngineOutput(token_ids=[token])
            if seq.generated == 1:
                out.cached_tokens = seq.cached_tokens
            if seq.logprobs is not None:
                # The choice is certain: probability 1, no alternative.
                top = [(token, 0.0)] if seq.logprobs > 0 else []
                out.logprobs = [TokenLogprob(token, 0.0, top)]
            if seq.generated >= seq.max_new:
                out.finish_reason = FINISH_LENGTH
                del self.running[seq]
                self._release(seq)
                seq.state = DONE
            seq.outbox.put_nowait(out)

    def _store_full_blocks(self, seq: Sequence) -> None:
        size = self.pool.block_size
        full = seq.kv_len // size
        if full <= len(seq.blocks):
            return
        parent = seq.blocks[-1] if seq.blocks else None
        prompt_blocks = seq.prompt_blocks
        new: list[int] = []
        chain = parent
        for i in range(len(seq.blocks), full):
            if i < len(prompt_blocks):
                chain = prompt_blocks[i]
            else:
                chain = block_hash(chain, seq.tokens[i * size : (i + 1) * size])
            new.append(chain)
        self.pool.commit(new, parent)
        seq.blocks.extend(new)
        seq.reserved -= len(new)

    # --- helpers ------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks, seq.reserved)
        seq.blocks = []
        seq.reserved = 0

    def _finish(self, seq: Sequence, out: EngineOutput) -> None:
        seq.state = DONE
        seq.outbox.put_nowait(out)

    def _fail_all(self, error: str) -> None:
        for seq in [*self.running, *self.waiting]:
            if seq.state == RUNNING:
                self._release(seq)
            self._finish(seq, EngineOutput(finish_reason=FINISH_ERROR, error=error))
        self.running.clear()
        self.waiting.clear()

    def _drop_all(self) -> None:
        for seq in self.running:
            self._release(seq)
            seq.state = DONE
        for seq in self.waiting:
            seq.state = DONE
        self.running.clear()
        self.waiting.clear()
