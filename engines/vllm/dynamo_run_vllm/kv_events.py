"""vLLM's own KV events, re-hashed into ours and handed to the engine's event sink.

vLLM's engine core publishes what its prefix cache stores and evicts (KVEventsConfig, a ZMQ
PUB socket: frames topic, 8-byte sequence number, msgpack ``KVEventBatch``). Its block
hashes are its own, but our router indexes chained hashes of token blocks
(dynamo_run.kv_blocks), so each ``BlockStored`` is re-hashed from the token ids it carries,
in blocks of *our* block size (the router's), following the parent block's hash. A map from
vLLM's hash to ours turns ``BlockRemoved`` into our removals.

vLLM's blocks (128 tokens on the CPU by default) must be a whole number of ours (16 by
default); each of its blocks becomes several of ours. A vLLM hash may be stored more than
once (two requests computing the same block): it counts its holders and is reported
removed when the last one goes.

A thread reads the socket; gaps in the sequence numbers (the subscription is not yet
established, or the high-water mark dropped some) are filled from vLLM's replay socket.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from dynamo_run.engine import KvEventSink
from dynamo_run.engine_support.kv_rehash import KvRehasher

log = logging.getLogger("dynamo_run.vllm")

_END_SEQ = -1


class KvEventMapper(KvRehasher):
    """vLLM's KV events -> ours, in blocks of ``block_size`` tokens. One thread applies
    events; ``set_sink`` may be called from another."""

    def __init__(self, block_size: int, sink: KvEventSink | None = None) -> None:
        super().__init__(block_size, engine="vllm", count_repeats=True)
        if sink is not None:
            self.set_sink(sink)

    def apply(self, event: Any) -> None:
        """One vLLM event (BlockStored, BlockRemoved or AllBlocksCleared)."""
        kind = type(event).__name__
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            self.removed(event.block_hashes)
        elif kind == "AllBlocksCleared":
            self.clear()

    def _stored(self, event: Any) -> None:
        vllm_size = int(event.block_size)
        if vllm_size % self.block_size:
            if self.skipped == 0:
                log.warning(
                    "vllm: KV blocks of %d tokens are not a multiple of %d; not reported",
                    vllm_size,
                    self.block_size,
                )
            self.skipped += len(event.block_hashes)
            return
        tokens = list(event.token_ids)
        blocks = [
            (vllm_hash, tokens[i * vllm_size : (i + 1) * vllm_size])
            for i, vllm_hash in enumerate(event.block_hashes)
        ]
        self.stored(event.parent_block_hash, blocks, tokens_per_block=vllm_size)


class KvEventSubscriber:
    """A thread that reads vLLM's KV event socket into a KvEventMapper."""

    def __init__(self, endpoint: str, replay_endpoint: str | None, mapper: KvEventMapper) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.mapper = mapper
        self._zmq = zmq
        self._decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._next_seq = 0
        self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                _topic, seq_bytes, payload = self._sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq > self._next_seq:
                    self._replay(self._next_seq, seq)
                if seq >= self._next_seq:
                    self._apply(payload)
                    self._next_seq = seq + 1
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("vllm: reading KV events failed")

    def _replay(self, start: int, until: int) -> None:
        """Fetch batches [start, until) that the subscription missed."""
        if not self.replay_endpoint:
            log.warning("vllm: KV event batches %d..%d missed", start, until - 1)
            return
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.connect(self.replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            while sock.poll(2000):
                frames = sock.recv_multipart()
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == _END_SEQ:
                    return
                if self._next_seq <= seq < until:
                    self._apply(frames[-1])
                    self._next_seq = seq + 1
            log.warning("vllm: no KV event replay from %s", self.replay_endpoint)
        finally:
            sock.close(linger=0)

    def _apply(self, payload: bytes) -> None:
        batch = self._decode(payload)
        self.batches += 1
        for event in batch.events:
            self.mapper.apply(event)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self._sub.close(linger=0)
            self._ctx.term()
