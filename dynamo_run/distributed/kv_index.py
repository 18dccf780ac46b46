"""Which worker instance holds which KV blocks: the index a KV-aware router consults.

Block hashes are chained (dynamo_run.kv_blocks): a block's hash names the whole prefix that
ends with it, so equal prefixes give equal hashes on every worker. A prompt's overlap with an
instance is therefore the number of leading hashes of the prompt's own chain that the instance
holds, found by walking the chain in order and stopping at the first miss. No tree is needed
to answer that: the index is a hash map from block hash to the set of instances holding it.

The set is a bitmask (one bit per instance), so the walk costs one dict lookup and one integer
``&`` per block whatever the number of instances, and instances drop out of the walk all at
once when the prompt diverges from what they hold: time linear in the prompt's block count.

Block parents are not kept: the walk follows the prompt's chain, which already says which
block follows which, and a block stored after a parent the index never saw (events lost or out
of order) is stored all the same; it counts as soon as its prefix is held too. A block whose
parent was removed stays held (the engine still has it) but is out of reach of the walk, as it
is out of reach of the engine's own prefix match.

:class:`ApproxKvIndex` serves routers whose workers publish no events (``--no-kv-events``): it
assumes each routing decision left the prompt's blocks cached on the chosen instance for a
while (a TTL, 120 s by default).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

log = logging.getLogger("dynamo_run.kv_index")

DEFAULT_TTL_S = 120.0


class KvIndex:
    """Block hash -> instances holding it, fed by the workers' KV events.

    Not thread-safe: apply events and query from one thread (the frontend's event loop).
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self._holders: dict[int, int] = {}  # block hash -> bitmask of instances holding it
        self._blocks: dict[str, set[int]] = {}  # instance id -> hashes it holds
        self._bits: dict[str, int] = {}  # instance id -> its bit (a power of two)
        self._ids: list[str | None] = []  # bit position -> instance id (None: free)
        self._free: list[int] = []  # bit positions to reuse, so masks stay small
        self._warned_block_size: set[str] = set()

    # --- events ---------------------------------------------------------------------------
    def apply(self, instance_id: str, event: KvCacheEvent) -> bool:
        """Apply one of ``instance_id``'s KV events. False when the event was ignored: an
        unknown kind, or another block size (its hashes could never match a prompt here)."""
        if event.block_size != self.block_size:
            if instance_id not in self._warned_block_size:
                self._warned_block_size.add(instance_id)
                log.warning(
                    "instance %s reports KV blocks of %d tokens, the router uses %d: its "
                    "cache is ignored (set the same --kv-cache-block-size everywhere)",
                    instance_id, event.block_size, self.block_size,
                )  # fmt: skip
            return False
        if event.kind == KV_STORED:
            self.store(instance_id, event.block_hashes)
        elif event.kind == KV_REMOVED:
            self.remove(instance_id, event.block_hashes)
        elif event.kind == KV_CLEARED:
            self.clear(instance_id)
        else:
            log.debug("instance %s: unknown KV event kind %r", instance_id, event.kind)
            return False
        return True

    def store(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """``instance_id`` now holds these blocks (their parent need not be known)."""
        bit = self._bit(instance_id)
        held = self._blocks[instance_id]
        holders = self._holders
        for block_hash in block_hashes:
            if block_hash not in held:
                held.add(block_hash)
                holders[block_hash] = holders.get(block_hash, 0) | bit

    def remove(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """``instance_id`` no longer holds these blocks (unknown ones are skipped)."""
        held = self._blocks.get(instance_id)
        if not held:
            return
        keep = ~self._bits[instance_id]
        holders = self._holders
        for block_hash in block_hashes:
            if block_hash in held:
                held.remove(block_hash)
                mask = holders[block_hash] & keep
                if mask:
                    holders[block_hash] = mask
                else:
                    del holders[block_hash]

    def clear(self, instance_id: str) -> None:
        """``instance_id`` holds nothing any more (it stays known)."""
        held = self._blocks.get(instance_id)
        if held:
            self.remove(instance_id, list(held))

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance that left discovery, with everything it held."""
        self.clear(instance_id)
        bit = self._bits.pop(instance_id, None)
        if bit is None:
            return
        del self._blocks[instance_id]
        position = bit.bit_length() - 1
        self._ids[position] = None
        self._free.append(position)
        self._warned_block_size.discard(instance_id)

    # --- queries --------------------------------------------------------------------------
    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each instance holding the first block, how many leading blocks of this chain
        it holds. Instances holding none of the prefix are absent."""
        if not block_hashes:
            return {}
        get = self._holders.get
        alive = get(block_hashes[0], 0)
        if not alive:
            return {}
        drops: list[tuple[int, int]] = []  # (instances that stop here, depth reached)
        for depth in range(1, len(block_hashes)):
            still = alive & get(block_hashes[depth], 0)
            if still != alive:
                drops.append((alive ^ still, depth))
                if not still:
                    break
                alive = still
        else:
            drops.append((alive, len(block_hashes)))
        ids = self._ids
        result: dict[str, int] = {}
        for mask, depth in drops:
            while mask:
                low = mask & -mask
                result[ids[low.bit_length() - 1]] = depth  # type: ignore[index]
                mask ^= low
        return result

    def cached_blocks(self, instance_id: str) -> int:
        """How many blocks the instance holds (for ``dynamo-run ps`` and metrics)."""
        return len(self._blocks.get(instance_id, ()))

    def instances(self) -> set[str]:
        """Instances the index knows of, so that a caller can drop those no longer live."""
        return set(self._bits)

    def __len__(self) -> int:
        """Distinct blocks held by any instance."""
        return len(self._holders)

    # --- internals ------------------------------------------------------------------------
    def _bit(self, instance_id: str) -> int:
        bit = self._bits.get(instance_id)
        if bit is None:
            if self._free:
                position = self._free.pop()
                self._ids[position] = instance_id
            else:
                position = len(self._ids)
                self._ids.append(instance_id)
            bit = self._bits[instance_id] = 1 << position
            self._blocks[instance_id] = set()
        return bit


class ApproxKvIndex(KvIndex):
    """A KV index predicted from the router's own decisions, for workers that publish no
    KV events: a prompt routed to an instance is assumed cached there for ``ttl_s`` seconds
    after the last request that used it (Dynamo's approximate indexer does the same).

    Expiry is lazy: every query and record first drops what has expired by ``clock()``.
    ``apply`` still works (a ``cleared`` from a worker, say) and overrides the prediction.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(block_size)
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_s = ttl_s
        self.clock = clock
        self._expiry: dict[str, dict[int, float]] = {}  # instance -> block hash -> deadline
        # (deadline, sequence, instance, hashes) per decision; an entry whose hash has a
        # later deadline in _expiry was refreshed since and is skipped when popped.
        self._heap: list[tuple[float, int, str, tuple[int, ...]]] = []
        self._sequence = 0

    def record(self, instance_id: str, block_hashes: Sequence[int]) -> None:
        """The router sent a prompt with this chain to ``instance_id``: predict it cached
        there until ``ttl_s`` from now (refreshing blocks already predicted)."""
        now = self.clock()
        self.expire(now)
        if not block_hashes:
            return
        deadline = now + self.ttl_s
        self.store(instance_id, block_hashes)
        expiry = self._expiry.setdefault(instance_id, {})
        for block_hash in block_hashes:
            expiry[block_hash] = deadline
        self._sequence += 1
        heapq.heappush(self._heap, (deadline, self._sequence, instance_id, tuple(block_hashes)))

    def expire(self, now: float | None = None) -> int:
        """Drop predictions whose deadline has passed; how many blocks were dropped."""
        if now is None:
            now = self.clock()
        heap = self._heap
        dropped = 0
        while heap and heap[0][0] <= now:
            deadline, _, instance_id, hashes = heapq.heappop(heap)
            expiry = self._expiry.get(instance_id)
            if not expiry:
                continue
            gone = [h for h in hashes if expiry.get(h) == deadline]
            for block_hash in gone:
                del expiry[block_hash]
            self.remove(instance_id, gone)
            dropped += len(gone)
        return dropped

    def apply(self, instance_id: str, event: KvCacheEvent) -> bool:
        """As :meth:`KvIndex.apply`. What a worker reports is known, not predicted: blocks
        it names are taken out of the TTL bookkeeping (stored ones then stay until removed)."""
        applied = super().apply(instance_id, event)
        expiry = self._expiry.get(instance_id)
        if applied and expiry:
            if event.kind == KV_CLEARED:
                expiry.clear()
            else:
                for block_hash in event.block_hashes:
                    expiry.pop(block_hash, None)
        return applied

    def remove_instance(self, instance_id: str) -> None:
        super().remove_instance(instance_id)
        self._expiry.pop(instance_id, None)

    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        self.expire()
        return super().overlaps(block_hashes)

    def cached_blocks(self, instance_id: str) -> int:
        self.expire()
        return super().cached_blocks(instance_id)
