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
from collections.abc import Sequence
from typing import Any

import msgspec

from dynamo_run.engine_support.kv_rehash import KvRehasher

log = logging.getLogger("dynamo_run.sglang")

# Field order of the array form of each event (older publishers encode events as
# ``[tag, field, ...]``; current ones as maps with a ``type`` key).
_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


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


class KvEventTranslator(KvRehasher):
    """SGLang's events in, ours out to the sink. Only the GPU tier counts, and the block
    size follows the page size SGLang settled on."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size, engine="sglang")

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if event.get("medium") not in (None, "GPU"):
            return  # host / disk tiers of the hierarchical cache: not what routing compares
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            self.removed(event.get("block_hashes") or [])
        elif kind == "AllBlocksCleared":
            self.clear()

    def _stored(self, event: dict[str, Any]) -> None:
        hashes: Sequence[Any] = event.get("block_hashes") or []
        tokens: Sequence[int] = event.get("token_ids") or []
        with self.lock:
            bs = int(event.get("block_size") or self.block_size)
            if bs != self.block_size:
                if self.held:
                    log.warning(
                        "sglang: KV event block size %d, not %d; ignored", bs, self.block_size
                    )
                    return
                # SGLang settled on another page size than we asked for (some attention
                # backends force one): report blocks of its size; each event says which.
                self.block_size = bs
            blocks = [(h, tokens[i * bs : (i + 1) * bs]) for i, h in enumerate(hashes)]
            self.stored(event.get("parent_block_hash"), blocks)


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
