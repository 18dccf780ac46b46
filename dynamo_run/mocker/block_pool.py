"""The simulated KV block pool: fixed capacity, prefix reuse by chained block hash, LRU.

Every block of the pool is in one of three states:

- *cached*: it holds a full block of tokens, named by its chained hash (dynamo_run.kv_blocks).
  Running sequences pin it (a reference count); at count 0 it stays cached but idle, and
  idle blocks are evicted least recently released first when the pool needs room;
- *reserved*: set aside for a running sequence's tokens that do not fill a cached block yet
  (its future blocks and its partial last block);
- *free*.

Every change to the set of cached hashes is reported to the event sink: ``stored`` when
blocks become cached, ``removed`` when they are evicted, ``cleared`` by :meth:`clear`. Replaying
the events gives exactly :meth:`cached_hashes`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from dynamo_run.engine import KvEventSink
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

log = logging.getLogger(__name__)


class PoolExhausted(RuntimeError):
    """Not enough free or evictable blocks for what was asked."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, sink: KvEventSink | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sink = sink
        self._refs: dict[int, int] = {}  # cached block hash -> sequences pinning it
        self._idle: OrderedDict[int, None] = OrderedDict()  # ref 0, least recently used first
        self._reserved = 0

    # --- what the pool holds ------------------------------------------------------------
    def cached_hashes(self) -> set[int]:
        """Hashes of every cached block, pinned or idle."""
        return set(self._refs)

    def ref_count(self, block_hash: int) -> int | None:
        """How many sequences pin this block; None when it is not cached."""
        return self._refs.get(block_hash)

    def idle_hashes(self) -> list[int]:
        """Idle cached blocks in eviction order (first evicted first)."""
        return list(self._idle)

    @property
    def used(self) -> int:
        """Blocks held by running sequences: pinned cached blocks plus reservations."""
        return len(self._refs) - len(self._idle) + self._reserved

    @property
    def free(self) -> int:
        """Blocks holding nothing at all."""
        return self.num_blocks - len(self._refs) - self._reserved

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones plus idle ones (by evicting)."""
        return self.free + len(self._idle)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a chain are cached."""
        n = 0
        for block_hash in hashes:
            if block_hash not in self._refs:
                break
            n += 1
        return n

    # --- admission and release ----------------------------------------------------------
    def extra_used(self, reuse: Sequence[int], reserve: int) -> int:
        """How much :attr:`used` would grow if :meth:`acquire` took these."""
        return sum(1 for h in reuse if self._refs[h] == 0) + reserve

    def can_acquire(self, reuse: Sequence[int], reserve: int) -> bool:
        """Whether :meth:`acquire` would succeed now (pinning idle blocks takes them out of
        the evictable set)."""
        idle_reused = sum(1 for h in reuse if self._refs[h] == 0)
        return reserve <= self.available - idle_reused

    def acquire(self, reuse: Sequence[int], reserve: int) -> None:
        """Pin the cached blocks ``reuse`` and reserve ``reserve`` more, evicting idle blocks
        as needed. Raises PoolExhausted (changing nothing) when it cannot."""
        if not self.can_acquire(reuse, reserve):
            raise PoolExhausted(
                f"{reserve} KV blocks wanted, {self.available} free or evictable "
                f"of {self.num_blocks}"
            )
        for block_hash in reuse:
            self._pin(block_hash)
        self._evict(reserve - self.free)
        self._reserved += reserve

    def commit(self, hashes: Sequence[int], parent: int | None) -> None:
        """Turn one reserved block per hash into a cached, pinned block. ``hashes`` continue
        the chain after ``parent``. A hash already cached (another sequence computed the same
        prefix) is pinned instead, and its reserved block goes back to the free blocks."""
        if len(hashes) > self._reserved:
            raise PoolExhausted(f"{len(hashes)} blocks to store, {self._reserved} reserved")
        self._reserved -= len(hashes)
        run: list[int] = []
        run_parent = parent
        for block_hash in hashes:
            if block_hash in self._refs:
                self._emit_stored(run, run_parent)
                run, run_parent = [], block_hash
                self._pin(block_hash)
            else:
                self._refs[block_hash] = 1
                run.append(block_hash)
        self._emit_stored(run, run_parent)

    def release(self, hashes: Sequence[int], reserved: int) -> None:
        """A sequence is done with its pinned blocks ``hashes`` (in chain order) and its
        ``reserved`` blocks. Blocks nobody pins become idle, the chain's end first, so that
        eviction takes the tail of a prefix before its head."""
        self._reserved -= reserved
        for block_hash in reversed(hashes):
            count = self._refs[block_hash] - 1
            self._refs[block_hash] = count
            if count == 0:
                self._idle[block_hash] = None

    def clear(self) -> None:
        """Forget everything (engine shutdown)."""
        self._refs.clear()
        self._idle.clear()
        self._reserved = 0
        self._send(KvCacheEvent(kind=KV_CLEARED, block_size=self.block_size))

    # --- internals ----------------------------------------------------------------------
    def _pin(self, block_hash: int) -> None:
        count = self._refs[block_hash]
        if count == 0:
            del self._idle[block_hash]
        self._refs[block_hash] = count + 1

    def _evict(self, n: int) -> None:
        if n <= 0:
            return
        evicted = []
        for _ in range(n):
            block_hash, _ = self._idle.popitem(last=False)
            del self._refs[block_hash]
            evicted.append(block_hash)
        self._send(KvCacheEvent(kind=KV_REMOVED, block_hashes=evicted, block_size=self.block_size))

    def _emit_stored(self, hashes: list[int], parent: int | None) -> None:
        if hashes:
            self._send(
                KvCacheEvent(
                    kind=KV_STORED,
                    block_hashes=list(hashes),
                    parent_hash=parent,
                    block_size=self.block_size,
                )
            )

    def _send(self, event: KvCacheEvent) -> None:
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception:  # a broken listener must not stop the engine
            log.exception("mocker: KV event sink failed")
