"""An engine's KV cache events re-hashed into our chained block hashes.

Engines publish what their prefix cache stores and evicts under their own block hashes,
but a router compares workers of every engine by ours (dynamo_run.kv_blocks). So each
stored block is hashed again from its token ids, chained from our hash of its parent, and
the engine's hash is remembered only to translate its later removals and its children's
parents. Each adapter decodes its engine's wire format and calls ``stored`` / ``removed``
/ ``clear`` here.

An engine block may span several of ours (vLLM's 128-token CPU blocks are eight of our
16-token ones). Holders are counted per hash of ours, because two engine blocks (different
cache salts or LoRA ids, say) can hold the same tokens: a hash is reported stored when the
first holder comes and removed when the last one goes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dynamo_run.engine import KvEventSink
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

log = logging.getLogger("dynamo_run.kv_rehash")


def _key(value: Any) -> Hashable:
    """An engine hash as a dict key (msgpack decodes some as lists)."""
    return tuple(value) if isinstance(value, list) else value


@dataclass
class _Held:
    """One engine block we know: our hashes for its tokens, and how often it is held."""

    ours: list[int]
    count: int = 1


class KvRehasher:
    """Engine KV events in, ours out to the sink, in blocks of ``block_size`` tokens.

    ``count_repeats``: a second ``stored`` of an engine hash that is still held is another
    holder that its own ``removed`` will release (vLLM stores a block hash once per
    request that computed it); otherwise the repeat is ignored. ``engine`` names the
    engine in log lines. Thread-safe; ``lock`` (reentrant) lets an adapter make a
    check and an update one step.
    """

    def __init__(self, block_size: int, *, engine: str = "engine", count_repeats: bool = False):
        self.block_size = block_size
        self.engine = engine
        self.count_repeats = count_repeats
        self.lock = threading.RLock()
        self.skipped = 0  # stored engine blocks whose parent we never saw (joined late)
        self.events = 0  # events handed to a sink
        self._sink: KvEventSink | None = None
        self._theirs: dict[Hashable, _Held] = {}  # engine hash -> our hashes of its tokens
        self._refs: dict[int, int] = {}  # our hash -> engine blocks holding it
        self._parent: dict[int, int | None] = {}  # our hash -> our parent hash

    @property
    def held(self) -> int:
        """How many of our blocks are held now."""
        return len(self._refs)

    def set_sink(self, sink: KvEventSink | None) -> None:
        """A new sink first hears what is held now (as ``stored``, parents first), so it
        starts in step; a replaced one hears ``cleared``, as it will hear nothing more."""
        with self.lock:
            old, self._sink = self._sink, sink
            if old is not None and old is not sink:
                self._send_to(old, KvCacheEvent(KV_CLEARED, block_size=self.block_size))
            if sink is not None and sink is not old:
                for ours, parent in self._parent.items():  # insertion order: parents first
                    self._send(KvCacheEvent(KV_STORED, [ours], parent, self.block_size))

    def stored(
        self,
        parent: Hashable | None,
        blocks: Iterable[tuple[Hashable, Sequence[int]]],
        tokens_per_block: int | None = None,
    ) -> None:
        """Engine blocks ``(engine hash, token ids)`` stored in chain order after the
        engine block ``parent`` (None: at the start of a sequence). Each block holds
        ``tokens_per_block`` tokens (default ``block_size``; a multiple of it); a block
        with other than that many ends the event, since a partial block is never shared.
        Blocks whose parent we never saw cannot be hashed and are only counted."""
        size = tokens_per_block or self.block_size
        blocks = list(blocks)
        with self.lock:
            ours_parent: int | None = None
            if parent is not None:
                before = self._theirs.get(_key(parent))
                if before is None:
                    self.skipped += len(blocks)
                    return
                ours_parent = before.ours[-1]
            run: list[int] = []  # our hashes nobody held before, in chain order
            run_parent = ours_parent  # our hash before run[0]
            for theirs, tokens in blocks:
                if len(tokens) != size or size % self.block_size:
                    break
                ours = block_hashes(list(tokens), self.block_size, ours_parent)
                entry = self._theirs.get(_key(theirs))
                if entry is not None:
                    if self.count_repeats:
                        entry.count += 1
                    run = self._flush(run, run_parent)
                    run_parent = ours[-1]
                else:
                    self._theirs[_key(theirs)] = _Held(ours)
                    prev = ours_parent
                    for h in ours:
                        self._refs[h] = self._refs.get(h, 0) + 1
                        if self._refs[h] == 1:
                            self._parent[h] = prev
                            run.append(h)  # run_parent is prev when run was empty
                        else:  # held through another engine block already
                            run = self._flush(run, run_parent)
                            run_parent = h
                        prev = h
                ours_parent = ours[-1]
            self._flush(run, run_parent)

    def removed(self, hashes: Iterable[Hashable]) -> None:
        """Engine blocks evicted; ours are reported removed once nothing holds them
        (children before parents within a block). Unknown hashes are ignored."""
        with self.lock:
            gone: list[int] = []
            for theirs in hashes:
                key = _key(theirs)
                entry = self._theirs.get(key)
                if entry is None:
                    continue
                entry.count -= 1
                if entry.count > 0:
                    continue
                del self._theirs[key]
                for h in reversed(entry.ours):
                    self._refs[h] -= 1
                    if self._refs[h] == 0:
                        del self._refs[h]
                        del self._parent[h]
                        gone.append(h)
            if gone:
                self._send(KvCacheEvent(KV_REMOVED, gone, block_size=self.block_size))

    def clear(self) -> None:
        """Everything the engine held is gone (it cleared its cache, or it closed)."""
        with self.lock:
            self._theirs.clear()
            self._refs.clear()
            self._parent.clear()
            self._send(KvCacheEvent(KV_CLEARED, block_size=self.block_size))

    def _flush(self, run: list[int], parent: int | None) -> list[int]:
        if run:
            self._send(KvCacheEvent(KV_STORED, run, parent, self.block_size))
        return []

    def _send(self, event: KvCacheEvent) -> None:
        if self._sink is not None:
            self._send_to(self._sink, event)

    def _send_to(self, sink: KvEventSink, event: KvCacheEvent) -> None:
        self.events += 1
        try:
            sink(event)
        except Exception:  # a broken listener must not stop the engine's event reader
            log.exception("%s: KV event sink failed", self.engine)
