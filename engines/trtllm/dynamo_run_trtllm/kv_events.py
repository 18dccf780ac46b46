"""TensorRT-LLM's KV cache events, re-hashed into our chained block hashes.

With ``kv_cache_config.event_buffer_max_size`` > 0 and block reuse on, the LLM keeps
events that ``get_kv_cache_events_async`` hands out as dicts:
``{"event_id", "data": {"type": "stored", "parent_hash", "blocks": [{"block_hash",
"tokens": [{"token_id", ...}]}]}}``, ``{"type": "removed", "block_hashes"}``, and
``created`` / ``updated`` (capacity and priority changes, which routing ignores). Their
hashes are not ours, so each stored block is hashed again from its token ids, chained from
our hash of its parent; their hash is kept only to translate later removals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Any

from dynamo_run.engine import KvEventSink
from dynamo_run.kv_blocks import block_hash
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

log = logging.getLogger("dynamo_run.trtllm")


def _key(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def _token_id(token: Any) -> int:
    if isinstance(token, dict):
        return int(token["token_id"])
    return int(getattr(token, "token_id", token))


class KvEventTranslator:
    """TensorRT-LLM's events in, ours out to the sink, with holder counts per hash of ours
    (two of their blocks, say with different LoRA ids, can hold the same tokens)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._sink: KvEventSink | None = None
        self._theirs: dict[Hashable, int] = {}  # their hash -> our hash
        self._refs: dict[int, int] = {}  # our hash -> their blocks holding it
        self._parent: dict[int, int | None] = {}  # our hash -> our parent hash
        self.skipped = 0  # stored blocks whose parent we never saw

    @property
    def held(self) -> int:
        return len(self._refs)

    def set_sink(self, sink: KvEventSink | None) -> None:
        """A new sink first hears what is held now (parents first); a replaced one hears
        ``cleared``."""
        with self._lock:
            old, self._sink = self._sink, sink
            if old is not None and old is not sink:
                old(KvCacheEvent(KV_CLEARED, block_size=self.block_size))
            if sink is not None and sink is not old:
                for ours, parent in self._parent.items():
                    sink(KvCacheEvent(KV_STORED, [ours], parent, self.block_size))

    def handle(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        kind = data.get("type")
        with self._lock:
            if kind == "stored":
                out = self._stored(data.get("parent_hash"), data.get("blocks") or [])
            elif kind == "removed":
                out = self._removed(data.get("block_hashes") or [])
            else:
                return
            if self._sink is not None:
                for ev in out:
                    self._sink(ev)

    def clear(self) -> None:
        """The engine closed: everything it held is gone."""
        with self._lock:
            self._theirs.clear()
            self._refs.clear()
            self._parent.clear()
            if self._sink is not None:
                self._sink(KvCacheEvent(KV_CLEARED, block_size=self.block_size))

    def _stored(self, parent_theirs: Any, blocks: Sequence[dict[str, Any]]) -> list[KvCacheEvent]:
        parent: int | None = None
        if parent_theirs is not None:
            parent = self._theirs.get(_key(parent_theirs))
            if parent is None:
                self.skipped += len(blocks)
                return []
        events: list[KvCacheEvent] = []
        for block in blocks:
            tokens = [_token_id(t) for t in block.get("tokens") or []]
            if len(tokens) != self.block_size:
                break  # a partial block is never shared
            ours = block_hash(parent, tokens)
            key = _key(block.get("block_hash"))
            if key not in self._theirs:
                self._theirs[key] = ours
                self._refs[ours] = self._refs.get(ours, 0) + 1
                if self._refs[ours] == 1:
                    self._parent[ours] = parent
                    last = events[-1] if events else None
                    if last is not None and last.block_hashes[-1] == parent:
                        last.block_hashes.append(ours)
                    else:
                        events.append(KvCacheEvent(KV_STORED, [ours], parent, self.block_size))
            parent = ours
        return events

    def _removed(self, hashes: Sequence[Any]) -> list[KvCacheEvent]:
        gone = []
        for theirs in hashes:
            ours = self._theirs.pop(_key(theirs), None)
            if ours is None:
                continue
            self._refs[ours] -= 1
            if self._refs[ours] == 0:
                del self._refs[ours]
                del self._parent[ours]
                gone.append(ours)
        return [KvCacheEvent(KV_REMOVED, gone, block_size=self.block_size)] if gone else []
