"""KV-aware choice of an instance: weigh the prefill an instance would save (the prompt's
prefix it already caches) against the decode load it already carries.

Dynamo's cost, per live instance, in KV blocks::

    cost = overlap_score_weight * (prompt blocks - cached overlap blocks) + active blocks
           (distinct blocks of the requests in flight there, plus this request's blocks
           that they do not already hold)

The first term is the prefill the instance would still have to compute; the second is the
blocks of the requests this router has in flight there (the caller reports them with
:meth:`KvRouter.add_active` / :meth:`KvRouter.remove_active`). A weight of 0 is pure load
balancing; a larger weight favours cache hits (better time to first token) over spreading the
decode load. Temperature 0 takes the cheapest instance; equal costs (cold prompts on idle
instances, say) go to the one with the fewest requests in flight, then the one picked least
recently, so that they spread instead of piling onto one. Above 0, an instance is sampled
with probability softmax(-normalised cost / temperature).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence

from dynamo_run.distributed.kv_index import ApproxKvIndex, KvIndex
from dynamo_run.distributed.wire import InstanceRecord
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE, block_hashes


class KvRouter:
    """Picks instances by KV cost. With an :class:`ApproxKvIndex` (no KV events) each pick is
    recorded in it as the prompt cached on the chosen instance.

    ``in_flight`` (requests per instance) has the same meaning and upkeep as
    :attr:`dynamo_run.distributed.router.Router.in_flight`; here it also breaks ties.
    """

    def __init__(
        self,
        index: KvIndex | None = None,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        overlap_score_weight: float = 1.0,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if index is None:
            index = KvIndex(block_size)
        elif index.block_size != block_size:
            raise ValueError(
                f"the index uses blocks of {index.block_size} tokens, the router {block_size}"
            )
        if overlap_score_weight < 0:
            raise ValueError("overlap_score_weight must not be negative")
        if temperature < 0:
            raise ValueError("temperature must not be negative")
        self.index = index
        self.block_size = block_size
        self.overlap_score_weight = overlap_score_weight
        self.temperature = temperature
        self._random = random.Random(seed)
        self.in_flight: dict[str, int] = defaultdict(int)
        # Instance id -> the KV blocks of its requests in flight, counted once however many
        # requests share them (as Dynamo's router does): a worker serving several requests
        # on one cached document carries that document's blocks once.
        self._active: dict[str, Counter[Hashable]] = {}
        # Other frontends' active blocks per instance (--router-replica-sync), added to ours.
        self.peer_active: Callable[[str], int] | None = None
        self._last_pick: dict[str, int] = {}  # instance id -> sequence number of its last pick
        self._picks = itertools.count()

    # --- load -----------------------------------------------------------------------------
    def request_blocks(self, token_ids: Sequence[int]) -> int:
        """KV blocks a sequence of this many tokens occupies (a partial last one counts)."""
        return -(-len(token_ids) // self.block_size)

    def request_keys(self, token_ids: Sequence[int]) -> list[Hashable]:
        """The KV blocks a request occupies, as keys: its full blocks' chained hashes (shared
        with other requests of the same prefix) and a key of its own for a partial last one."""
        keys: list[Hashable] = list(block_hashes(list(token_ids), self.block_size))
        if len(token_ids) % self.block_size:
            keys.append(object())
        return keys

    def add_active(self, instance_id: str, keys: Iterable[Hashable]) -> None:
        """A request occupying these block keys started on the instance."""
        self._active.setdefault(instance_id, Counter()).update(keys)

    def remove_active(self, instance_id: str, keys: Iterable[Hashable]) -> None:
        """A request occupying these block keys finished (or failed) on the instance."""
        active = self._active.get(instance_id)
        if active is None:
            return
        for key in keys:
            left = active.get(key, 0) - 1
            if left > 0:
                active[key] = left
            else:
                active.pop(key, None)
        if not active:
            self._active.pop(instance_id, None)

    def active_snapshot(self) -> dict[str, int]:
        """This router's own active blocks per instance (what replica sync shares)."""
        return {instance: len(keys) for instance, keys in self._active.items()}

    def active_blocks(self, instance_id: str) -> int:
        """The instance's decode load as this router counts it (distinct blocks)."""
        return len(self._active.get(instance_id, ()))

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance that left discovery: its cached blocks and its load."""
        self.index.remove_instance(instance_id)
        self._active.pop(instance_id, None)
        self._last_pick.pop(instance_id, None)
        self.in_flight.pop(instance_id, None)

    # --- choice ---------------------------------------------------------------------------
    def costs(
        self, instances: Sequence[InstanceRecord], token_ids: Sequence[int]
    ) -> tuple[list[float], list[int], list[int]]:
        """Each instance's cost and cached overlap (blocks) for this prompt, and the prompt's
        chained block hashes (what :meth:`pick` uses; exposed for logs and tests)."""
        hashes = block_hashes(list(token_ids), self.block_size)
        overlaps = self.index.overlaps(hashes)
        prompt_blocks = self.request_blocks(token_ids)
        weight = self.overlap_score_weight
        costs: list[float] = []
        cached: list[int] = []
        for record in instances:
            overlap = overlaps.get(record.instance_id, 0)
            cached.append(overlap)
            active = self._active.get(record.instance_id)
            load = len(active) if active else 0
            # The blocks this request adds to that load: a worker already decoding the same
            # prefix takes it on for less (Dynamo's cost counts the new request's blocks too).
            partial = prompt_blocks - len(hashes)
            load += partial + (sum(h not in active for h in hashes) if active else len(hashes))
            if self.peer_active is not None:
                load += self.peer_active(record.instance_id)
            costs.append(weight * (prompt_blocks - overlap) + load)
        return costs, cached, hashes

    def pick(
        self,
        model: str,
        instances: list[InstanceRecord],
        token_ids: Sequence[int],
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> tuple[InstanceRecord, int] | None:
        """The instance of ``model`` to send this prompt to and how many of its leading blocks
        it caches; None when none is left to try. Skips ``exclude`` (instances that just
        failed the request) and prefers instances that are not draining, as Router does.
        ``instances`` are the model's live ones; ``model`` is for parity with Router.pick."""
        candidates = [r for r in instances if r.instance_id not in exclude and not r.draining] or [
            r for r in instances if r.instance_id not in exclude
        ]
        if not candidates:
            return None
        candidates.sort(key=lambda r: r.instance_id)  # a seed gives the same picks every run
        costs, cached, hashes = self.costs(candidates, token_ids)
        if self.temperature == 0.0 or len(candidates) == 1:
            chosen = self._cheapest(candidates, costs)
        else:
            chosen = self._sample(costs)
        record = candidates[chosen]
        self._last_pick[record.instance_id] = next(self._picks)
        if isinstance(self.index, ApproxKvIndex):
            self.index.record(record.instance_id, hashes)
        return record, cached[chosen]

    choose = pick  # Router.choose's interface, what RemoteEngine calls

    def _cheapest(self, candidates: list[InstanceRecord], costs: list[float]) -> int:
        best = min(costs)
        tied = [i for i, cost in enumerate(costs) if math.isclose(cost, best, abs_tol=1e-9)]
        if len(tied) > 1:
            ids = [candidates[i].instance_id for i in tied]
            keys = [(self.in_flight.get(i, 0), self._last_pick.get(i, -1)) for i in ids]
            least = min(keys)
            tied = [i for i, key in zip(tied, keys, strict=True) if key == least]
        return tied[0] if len(tied) == 1 else self._random.choice(tied)

    def _sample(self, costs: list[float]) -> int:
        low, high = min(costs), max(costs)
        if high - low <= 1e-12:
            return self._random.randrange(len(costs))
        # Costs normalised to [0, 1] so that the temperature means the same whatever the
        # prompt length; the cheapest instance has logit 0, the dearest -1/temperature.
        scale = (high - low) * self.temperature
        weights = [math.exp(-(cost - low) / scale) for cost in costs]
        return self._random.choices(range(len(costs)), weights=weights)[0]
