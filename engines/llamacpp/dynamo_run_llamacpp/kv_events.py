"""KV events of the llama.cpp engine: which prefixes it can reuse, in whole blocks.

llama.cpp caches per token, but a KV-aware router compares workers by chained block hashes
(dynamo_run.kv_blocks), so the engine describes what it holds in blocks of ``block_size``
tokens (``--kv-cache-block-size``): the full blocks of every slot's tokens and of every
prompt-cache entry's tokens. A slot and the prompt cache, or two slots, can hold the same
block, so each hash has a count of holders:

- ``stored`` (with ``parent_hash``, the hash of the block before, None for a first block)
  when a hash gets its first holder: a prompt prefilled into a slot, generated tokens that
  complete a block, a prompt state saved into (or restored from) the prompt cache;
- ``removed`` when a hash loses its last holder: a slot reused for another prompt keeps only
  the common prefix, a prompt-cache entry is evicted or replaced by a longer one;
- ``cleared`` when the engine closes, or when the sink is replaced (the old sink is told).

Replaying a sink's events gives exactly the set of hashes the engine holds. Everything here
runs on the scheduler thread; each holder keeps its own chain of hashes, so a new block
costs one ``block_hash`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dynamo_run.engine import KvEventSink
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

log = logging.getLogger("dynamo_run.llamacpp")


class KvTracker:
    """Holder counts of the block hashes the engine holds, reported to ``sink``."""

    def __init__(self, block_size: int, sink: KvEventSink) -> None:
        self.block_size = block_size
        self.sink = sink
        self.refs: dict[int, int] = {}  # block hash -> how many chains hold it
        self.events = 0

    # --- chains ---------------------------------------------------------------------------
    def chain(self, tokens: np.ndarray) -> list[int]:
        """The hashes of every full block of ``tokens`` (held by nobody yet)."""
        full = len(tokens) - len(tokens) % self.block_size
        return block_hashes(tokens[:full].tolist(), self.block_size)

    def extend(self, hashes: list[int], tokens: np.ndarray) -> None:
        """A holder whose chain is ``hashes`` now holds ``tokens`` (its old tokens and more):
        hash and hold the blocks they complete, appending them to ``hashes``."""
        bs = self.block_size
        have = len(hashes)
        full = len(tokens) // bs
        if full <= have:
            return
        parent = hashes[-1] if have else None
        new = block_hashes(tokens[have * bs : full * bs].tolist(), bs, parent)
        hashes.extend(new)
        self.hold(new, parent)

    def truncate(self, hashes: list[int], n_tokens: int) -> None:
        """The holder keeps only its first ``n_tokens`` tokens."""
        keep = n_tokens // self.block_size
        if keep < len(hashes):
            tail = hashes[keep:]
            del hashes[keep:]
            self.release(tail)

    def replace(self, hashes: list[int], new: Sequence[int]) -> None:
        """The holder's chain becomes ``new`` (a state loaded over it). The new chain is held
        before the old one is let go, so that a prefix both share is not reported removed
        and stored again."""
        self.hold(new, None)
        old = hashes[:]
        hashes[:] = new
        self.release(old)

    # --- holder counts --------------------------------------------------------------------
    def hold(self, hashes: Sequence[int], parent: int | None) -> None:
        """One more holder of the chain ``hashes``, which follows the block ``parent``.
        Runs of hashes nobody held before are reported stored, each after its parent."""
        refs = self.refs
        run: list[int] = []
        run_parent = parent
        for block_hash in hashes:
            count = refs.get(block_hash, 0)
            refs[block_hash] = count + 1
            if count:
                if run:
                    self._stored(run, run_parent)
                    run = []
                run_parent = block_hash
            else:
                run.append(block_hash)
        if run:
            self._stored(run, run_parent)

    def release(self, hashes: Sequence[int]) -> None:
        """One holder fewer for each of ``hashes`` (a chain or its tail); those left with
        none are reported removed, the end of the chain first."""
        refs = self.refs
        removed = []
        for block_hash in reversed(hashes):
            count = refs[block_hash] - 1
            if count:
                refs[block_hash] = count
            else:
                del refs[block_hash]
                removed.append(block_hash)
        if removed:
            self._send(
                KvCacheEvent(kind=KV_REMOVED, block_hashes=removed, block_size=self.block_size)
            )

    def clear(self) -> None:
        """Nothing is held any more (the engine closes, or this sink is replaced)."""
        self.refs.clear()
        self._send(KvCacheEvent(kind=KV_CLEARED, block_size=self.block_size))

    # --- internals ------------------------------------------------------------------------
    def _stored(self, hashes: list[int], parent: int | None) -> None:
        self._send(
            KvCacheEvent(
                kind=KV_STORED, block_hashes=hashes, parent_hash=parent, block_size=self.block_size
            )
        )

    def _send(self, event: KvCacheEvent) -> None:
        self.events += 1
        try:
            self.sink(event)
        except Exception:  # a broken listener must not stop the engine
            log.exception("llamacpp: KV event sink failed")
