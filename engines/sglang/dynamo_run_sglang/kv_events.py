"""SGLang's KV events, received over ZMQ and re-hashed into our chained block hashes.

SGLang publishes what its radix cache stores and evicts when started with
``kv_events_config={"publisher": "zmq", "endpoint": ...}``: multipart messages
``(topic, seq, payload)`` whose msgpack payload is ``[ts, events, dp_rank]`` with events
``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, ...)``,
``BlockRemoved(block_hashes)`` and ``AllBlocksCleared``. Its hashes are not ours (a router
compares workers of every engine by dynamo_run.kv_blocks hashes), so each stored block is
hashed again from its token ids, chained from our hash of its parent, and SGLang's hash is
remembered only to translate later removals.

We bind the SUB socket on a free loopback port and SGLang's publisher connects to it, so
there is no port to pick and no race with another engine on the host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import msgspec

from dynamo_run.engine import KvEventSink
from dynamo_run.kv_blocks import block_hash
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

log = logging.getLogger("dynamo_run.sglang")

# Field order of the array form of each event (older publishers encode events as
# ``[tag, field, ...]``; current ones as maps with a ``type`` key).
_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


def _key(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """The events of one published batch, each a dict with ``type`` and its fields."""
    batch = msgspec.msgpack.decode(payload)
    raw_events = batch[1] if isinstance(batch, list) else batch.get("events", [])
    events = []
    for raw in raw_events:
        if isinstance(raw, dict):
            events.append(raw)
        elif isinstance(raw, list) and raw and raw[0] in _FIELDS:
            events.append({"type": raw[0], **dict(zip(_FIELDS[raw[0]], raw[1:], strict=False))})
    return events


class KvEventTranslator:
    """SGLang's events in, ours out to the sink. Holder counts per hash of ours, because
    two SGLang blocks (different cache salts, say) can hold the same tokens."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._sink: KvEventSink | None = None
        self._theirs: dict[Hashable, int] = {}  # SGLang hash -> our hash
        self._refs: dict[int, int] = {}  # our hash -> SGLang blocks holding it
        self._parent: dict[int, int | None] = {}  # our hash -> our parent hash
        self.skipped = 0  # stored blocks whose parent we never saw (joined late)

    def set_sink(self, sink: KvEventSink | None) -> None:
        """A new sink first hears what is held now (as ``stored``, parents first); a
        replaced one hears ``cleared``."""
        with self._lock:
            old, self._sink = self._sink, sink
            if old is not None and old is not sink:
                old(KvCacheEvent(KV_CLEARED, block_size=self.block_size))
            if sink is not None and sink is not old:
                for ours, parent in self._parent.items():  # insertion order: parents first
                    sink(KvCacheEvent(KV_STORED, [ours], parent, self.block_size))

    @property
    def held(self) -> int:
        return len(self._refs)

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if event.get("medium") not in (None, "GPU"):
            return  # host / disk tiers of the hierarchical cache: not what routing compares
        with self._lock:
            if kind == "BlockStored":
                out = self._stored(event)
            elif kind == "BlockRemoved":
                out = self._removed(event.get("block_hashes") or [])
            elif kind == "AllBlocksCleared":
                self._theirs.clear()
                self._refs.clear()
                self._parent.clear()
                out = [KvCacheEvent(KV_CLEARED, block_size=self.block_size)]
            else:
                return
            if self._sink is not None:
                for ev in out:
                    self._sink(ev)

    def _stored(self, event: dict[str, Any]) -> list[KvCacheEvent]:
        hashes: Sequence[Any] = event.get("block_hashes") or []
        tokens: Sequence[int] = event.get("token_ids") or []
        bs = int(event.get("block_size") or self.block_size)
        if bs != self.block_size:
            if self._refs:
                log.warning("sglang: KV event block size %d, not %d; ignored", bs, self.block_size)
                return []
            # SGLang settled on another page size than we asked for (some attention
            # backends force one): report blocks of its size; each event says which.
            self.block_size = bs
        parent_theirs = event.get("parent_block_hash")
        parent: int | None = None
        if parent_theirs is not None:
            parent = self._theirs.get(_key(parent_theirs))
            if parent is None:
                self.skipped += len(hashes)
                return []
        events: list[KvCacheEvent] = []
        for i, theirs in enumerate(hashes):
            block = list(tokens[i * bs : (i + 1) * bs])
            if len(block) < bs:
                break  # a partial block is never shared
            ours = block_hash(parent, block)
            key = _key(theirs)
            if key not in self._theirs:
                self._theirs[key] = ours
                self._refs[ours] = self._refs.get(ours, 0) + 1
                if self._refs[ours] == 1:
                    self._parent[ours] = parent
                    last = events[-1] if events else None
                    if last is not None and last.block_hashes[-1] == parent:
                        last.block_hashes.append(ours)  # continues the same run
                    else:
                        events.append(KvCacheEvent(KV_STORED, [ours], parent, bs))
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


class ZmqKvSubscriber:
    """A SUB socket on a free loopback port and a daemon thread feeding a translator."""

    def __init__(self, translator: KvEventTranslator) -> None:
        import zmq

        self.translator = translator
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sglang-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = self._zmq.Poller()
        poller.register(self._sock, self._zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                parts = self._sock.recv_multipart(self._zmq.NOBLOCK)
                for event in decode_batch(parts[-1]):
                    self.translator.handle(event)
            except self._zmq.Again:
                continue
            except Exception:  # a bad message must not end event forwarding
                log.exception("sglang: could not handle a KV event batch")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()
