"""The pure core of KV-aware routing: the block index fed by KV events, the index predicted
from routing decisions (--no-kv-events), and the cost-based choice of an instance."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dynamo_run.distributed.kv_index import ApproxKvIndex, KvIndex
from dynamo_run.distributed.kv_router import KvRouter
from dynamo_run.distributed.wire import InstanceRecord
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.mocker.block_pool import BlockPool
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED, KvCacheEvent

BS = 4  # small blocks keep the token lists short


def stored(hashes: list[int], parent: int | None = None, block_size: int = BS) -> KvCacheEvent:
    return KvCacheEvent(
        kind=KV_STORED, block_hashes=list(hashes), parent_hash=parent, block_size=block_size
    )


def removed(hashes: list[int]) -> KvCacheEvent:
    return KvCacheEvent(kind=KV_REMOVED, block_hashes=list(hashes), block_size=BS)


def cleared() -> KvCacheEvent:
    return KvCacheEvent(kind=KV_CLEARED, block_size=BS)


def tokens(prefix: int, n_blocks: int, start: int = 0) -> list[int]:
    """n_blocks full blocks of tokens, distinct per ``prefix`` value."""
    return [prefix * 100_000 + start + i for i in range(n_blocks * BS)]


def record(instance_id: str, draining: bool = False) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id, namespace="ns", component="c", endpoint="e",
        subject=f"dyn.ns.c.e.{instance_id}", model="m", engine="mocker", host="h", pid=1,
        card_digest="d", started_at=0.0, updated_at=0.0, lease_s=3.0, draining=draining,
    )  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- KvIndex ------------------------------------------------------------------------------
def test_stored_blocks_give_the_leading_overlap():
    index = KvIndex(BS)
    chain = block_hashes(tokens(1, 6), BS)
    assert index.apply("a", stored(chain[:4]))
    assert index.overlaps(chain) == {"a": 4}
    assert index.overlaps(chain[:2]) == {"a": 2}
    assert index.cached_blocks("a") == 4
    assert index.cached_blocks("nobody") == 0
    assert index.overlaps([]) == {}
    # Storing the rest after its parent (as an engine does once it prefills further).
    index.apply("a", stored(chain[4:], parent=chain[3]))
    assert index.overlaps(chain) == {"a": 6}
    assert len(index) == 6


def test_overlap_over_shared_and_diverging_chains():
    index = KvIndex(BS)
    system = tokens(7, 3)
    first = block_hashes(system + tokens(1, 2), BS)
    second = block_hashes(system + tokens(2, 4), BS)
    assert first[:3] == second[:3] and first[3] != second[3]
    index.apply("a", stored(first))
    index.apply("b", stored(second))
    index.apply("c", stored(second[:2]))
    assert index.overlaps(first) == {"a": 5, "b": 3, "c": 2}
    assert index.overlaps(second) == {"a": 3, "b": 7, "c": 2}
    unrelated = block_hashes(tokens(9, 3), BS)
    assert index.overlaps(unrelated) == {}
    # Shared blocks are counted once per holder.
    assert len(index) == 5 + 4
    assert [index.cached_blocks(i) for i in "abc"] == [5, 7, 2]


def test_removed_blocks_cut_the_overlap_at_the_first_miss():
    index = KvIndex(BS)
    chain = block_hashes(tokens(1, 6), BS)
    index.apply("a", stored(chain))
    index.apply("b", stored(chain))
    index.apply("a", removed([chain[2]]))
    # a still holds blocks 3..5, but past a missing block they are out of reach.
    assert index.overlaps(chain) == {"a": 2, "b": 6}
    assert index.cached_blocks("a") == 5
    index.apply("a", removed([chain[0], 12345]))  # an unknown hash is skipped
    assert index.overlaps(chain) == {"b": 6}
    index.apply("b", removed(chain))
    assert index.overlaps(chain) == {}
    assert len(index) == 4  # a's blocks 1, 3, 4 and 5: nobody else holds any
    assert index.cached_blocks("a") == 4 and index.cached_blocks("b") == 0


def test_cleared_forgets_an_instance_cache_but_keeps_the_others():
    index = KvIndex(BS)
    chain = block_hashes(tokens(1, 3), BS)
    index.apply("a", stored(chain))
    index.apply("b", stored(chain[:1]))
    assert index.apply("a", cleared())
    assert index.overlaps(chain) == {"b": 1}
    assert index.cached_blocks("a") == 0
    assert index.instances() == {"a", "b"}  # cleared, not gone
    index.apply("a", stored(chain[:2]))
    assert index.overlaps(chain) == {"a": 2, "b": 1}


def test_remove_instance_drops_its_blocks_and_a_new_instance_inherits_nothing():
    index = KvIndex(BS)
    chain = block_hashes(tokens(1, 4), BS)
    index.apply("a", stored(chain))
    index.apply("b", stored(chain[:2]))
    index.remove_instance("a")
    index.remove_instance("never-seen")
    assert index.instances() == {"b"}
    assert index.overlaps(chain) == {"b": 2}
    assert len(index) == 2
    # "c" takes a's freed slot in the masks and must not see what a held.
    index.apply("c", stored(chain[:1]))
    assert index.overlaps(chain) == {"b": 2, "c": 1}
    assert index.cached_blocks("a") == 0


def test_events_out_of_order_are_stored_anyway():
    index = KvIndex(BS)
    chain = block_hashes(tokens(1, 5), BS)
    # The tail arrives before the head: stored, but unreachable until the head is there.
    index.apply("a", stored(chain[3:], parent=chain[2]))
    assert index.overlaps(chain) == {}
    assert index.cached_blocks("a") == 2
    index.apply("a", stored(chain[:3]))
    assert index.overlaps(chain) == {"a": 5}
    # A duplicate stored event changes nothing; a removal of what was never stored neither.
    index.apply("a", stored(chain[:3]))
    index.apply("b", removed(chain))
    assert index.cached_blocks("a") == 5 and index.overlaps(chain) == {"a": 5}


def test_events_of_another_block_size_or_kind_are_ignored():
    index = KvIndex(BS)
    chain = block_hashes(tokens(1, 2), BS)
    assert not index.apply("a", stored(chain, block_size=BS * 2))
    assert not index.apply("a", KvCacheEvent(kind="resized", block_hashes=chain, block_size=BS))
    assert index.overlaps(chain) == {} and index.cached_blocks("a") == 0


def test_overlaps_match_a_brute_force_reference_over_many_instances():
    """More instances than 64 bits, random holdings with holes: the walk's answer equals the
    definition (leading blocks held, per instance)."""
    rng = random.Random(5)
    index = KvIndex(BS)
    prefixes = [block_hashes(tokens(p, 12), BS) for p in range(5)]
    held: dict[str, set[int]] = {}
    for n in range(80):
        instance = f"w{n:02d}"
        blocks: set[int] = set()
        for chain in rng.sample(prefixes, 2):
            blocks.update(chain[: rng.randint(0, 12)])
        index.apply(instance, stored(sorted(blocks)))
        holes = [h for h in blocks if rng.random() < 0.1]
        index.apply(instance, removed(holes))
        held[instance] = blocks - set(holes)
    for n in range(0, 80, 3):
        index.remove_instance(f"w{n:02d}")
        del held[f"w{n:02d}"]
    for chain in prefixes:
        expected = {}
        for instance, blocks in held.items():
            depth = 0
            while depth < len(chain) and chain[depth] in blocks:
                depth += 1
            if depth:
                expected[instance] = depth
        assert index.overlaps(chain) == expected
    assert len(index) == len(set().union(*held.values()))


def test_replaying_the_mocker_block_pool_events_mirrors_the_pool():
    """The mocker's pool emits stored (after a cached parent), removed (LRU eviction) and
    cleared: the index fed by them holds exactly what the pool holds."""
    index = KvIndex(BS)
    kinds: Counter[str] = Counter()

    def sink(event: KvCacheEvent) -> None:
        kinds[event.kind] += 1
        assert index.apply("m", event)

    pool = BlockPool(num_blocks=40, block_size=BS, sink=sink)
    rng = random.Random(11)
    prompts = []
    for _ in range(60):
        system = rng.randrange(4)
        prompt = tokens(system, 4) + tokens(100 + rng.randrange(30), rng.randint(1, 4))
        hashes = block_hashes(prompt, BS)
        cached = pool.cached_prefix(hashes)
        reuse, new = hashes[:cached], hashes[cached:]
        pool.acquire(reuse, len(new))
        pool.commit(new, hashes[cached - 1] if cached else None)
        pool.release(hashes, 0)
        prompts.append(hashes)
        assert index.cached_blocks("m") == len(pool.cached_hashes())
    assert kinds[KV_STORED] > 0 and kinds[KV_REMOVED] > 0  # the pool evicted on the way
    for hashes in prompts:
        assert index.overlaps(hashes).get("m", 0) == pool.cached_prefix(hashes)
    pool.clear()
    assert index.cached_blocks("m") == 0 and len(index) == 0


# --- ApproxKvIndex ------------------------------------------------------------------------
def test_approx_index_predicts_a_decision_until_its_ttl():
    clock = FakeClock()
    index = ApproxKvIndex(BS, ttl_s=120.0, clock=clock)
    chain = block_hashes(tokens(1, 4), BS)
    index.record("a", chain)
    assert index.overlaps(chain) == {"a": 4}
    clock.now += 119.0
    assert index.overlaps(chain) == {"a": 4}
    clock.now += 1.0
    assert index.overlaps(chain) == {}
    assert index.cached_blocks("a") == 0 and len(index) == 0


def test_approx_index_refreshes_blocks_used_again():
    clock = FakeClock()
    index = ApproxKvIndex(BS, ttl_s=10.0, clock=clock)
    first = block_hashes(tokens(7, 2) + tokens(1, 2), BS)
    second = block_hashes(tokens(7, 2) + tokens(2, 2), BS)
    index.record("a", first)
    clock.now += 6.0
    index.record("a", second)  # the shared 2 blocks now live until t+16
    clock.now += 5.0  # t+11: first's own blocks expired, the shared ones not
    assert index.overlaps(first) == {"a": 2}
    assert index.overlaps(second) == {"a": 4}
    clock.now += 5.0
    assert index.overlaps(second) == {}
    assert index.expire() == 0  # nothing left to drop


def test_approx_index_takes_reported_events_over_its_prediction():
    clock = FakeClock()
    index = ApproxKvIndex(BS, ttl_s=10.0, clock=clock)
    chain = block_hashes(tokens(1, 3), BS)
    index.record("a", chain)
    index.record("b", chain)
    index.apply("a", cleared())
    index.apply("b", stored(chain[:1]))  # reported: kept past the TTL
    assert index.overlaps(chain) == {"b": 3}
    clock.now += 10.0
    assert index.overlaps(chain) == {"b": 1}
    index.remove_instance("b")
    assert index.overlaps(chain) == {} and index.instances() == {"a"}


# --- KvRouter -----------------------------------------------------------------------------
def four() -> list[InstanceRecord]:
    return [record(f"w{i}") for i in range(4)]


def test_router_picks_the_instance_with_the_cached_prefix():
    router = KvRouter(block_size=BS, seed=1)
    system = tokens(7, 8)
    router.index.apply("w2", stored(block_hashes(system, BS)))
    for question in range(5):
        chosen, overlap = router.pick("m", four(), system + tokens(question + 1, 2))
        assert (chosen.instance_id, overlap) == ("w2", 8)
    # The costs behind it: 10 blocks to prefill on a cold instance, 2 on w2, plus the
    # request's own 10 blocks of load everywhere (nothing in flight shares them).
    costs, cached, hashes = router.costs(four(), system + tokens(1, 2))
    assert cached == [0, 0, 8, 0] and costs == [20, 20, 12, 20] and len(hashes) == 10


def test_router_spreads_cold_prompts_over_idle_instances():
    # Without load reports (requests that finish at once) ties rotate...
    router = KvRouter(block_size=BS, seed=3)
    picks = [router.pick("m", four(), tokens(p, 3))[0].instance_id for p in range(8)]
    assert Counter(picks) == {"w0": 2, "w1": 2, "w2": 2, "w3": 2}
    # ... and with them, each started request makes its instance dearer.
    router = KvRouter(block_size=BS, seed=4)
    picks = []
    for p in range(8):
        prompt = tokens(p, 3)
        chosen, overlap = router.pick("m", four(), prompt)
        router.add_active(chosen.instance_id, router.request_keys(prompt))
        picks.append(chosen.instance_id)
        assert overlap == 0
    assert Counter(picks) == {"w0": 2, "w1": 2, "w2": 2, "w3": 2}
    # Requests in flight break ties before recency does.
    router = KvRouter(block_size=BS, seed=5)
    router.in_flight.update({"w0": 1, "w1": 1, "w3": 1})
    assert router.pick("m", four(), tokens(1, 3))[0].instance_id == "w2"


def keys(n: int) -> list[object]:
    """Block keys of other requests' private blocks (nothing shared)."""
    return [object() for _ in range(n)]


def test_router_trades_cache_hits_against_decode_load():
    router = KvRouter(block_size=BS, seed=1)
    prompt = tokens(1, 10)
    router.index.apply("w0", stored(block_hashes(prompt, BS)))
    instances = four()[:2]
    other = keys(30)  # blocks of other requests in flight on w0
    router.add_active("w0", other[:5])  # w0: 0 to prefill + 5 active; w1: 10 + 0
    assert router.pick("m", instances, prompt) == (instances[0], 10)
    router.add_active("w0", other[5:])  # w0: 30 active > w1's 10 blocks of prefill
    chosen, overlap = router.pick("m", instances, prompt)
    assert (chosen.instance_id, overlap) == ("w1", 0)
    assert router.active_blocks("w0") == 30
    router.remove_active("w0", other[:22])  # 8 active < 10 to prefill
    assert router.pick("m", instances, prompt)[0].instance_id == "w0"
    router.remove_active("w0", other + keys(5))  # unknown keys: never below zero
    assert router.active_blocks("w0") == 0
    # Requests sharing a prefix count its blocks once (Dynamo's accounting).
    shared = router.request_keys(prompt)
    router.add_active("w0", shared)
    router.add_active("w0", router.request_keys(prompt))
    assert router.active_blocks("w0") == 10
    router.remove_active("w0", shared)
    assert router.active_blocks("w0") == 10  # the other request still holds them
    # A weight above 1 makes the saved prefill worth more than the load.
    heavy = KvRouter(router.index, block_size=BS, overlap_score_weight=4.0)
    heavy.add_active("w0", keys(30))
    assert heavy.pick("m", instances, prompt)[0].instance_id == "w0"


def test_router_with_weight_zero_ignores_the_cache():
    router = KvRouter(block_size=BS, overlap_score_weight=0.0, seed=1)
    prompt = tokens(1, 10)
    router.index.apply("w0", stored(block_hashes(prompt, BS)))
    router.add_active("w0", keys(1))
    for _ in range(3):
        chosen, overlap = router.pick("m", four()[:2], prompt)
        assert chosen.instance_id == "w1" and overlap == 0
    costs, cached, _ = router.costs(four()[:2], prompt)
    assert costs == [11, 10] and cached == [10, 0]  # load + the request's own 10 blocks


def test_router_skips_excluded_and_prefers_instances_not_draining():
    router = KvRouter(block_size=BS, seed=1)
    prompt = tokens(1, 4)
    router.index.apply("w0", stored(block_hashes(prompt, BS)))
    instances = [record("w0", draining=True), record("w1"), record("w2")]
    assert router.pick("m", instances, prompt)[0].instance_id in {"w1", "w2"}
    assert router.pick("m", instances, prompt, {"w1", "w2"})[0].instance_id == "w0"
    assert router.pick("m", instances, prompt, {"w0", "w1", "w2"}) is None
    assert router.pick("m", [], prompt) is None


def test_router_forgets_an_instance_that_left():
    router = KvRouter(block_size=BS, seed=1)
    prompt = tokens(1, 4)
    router.index.apply("w0", stored(block_hashes(prompt, BS)))
    router.add_active("w0", keys(3))
    router.in_flight["w0"] += 1
    router.remove_instance("w0")
    assert router.index.cached_blocks("w0") == 0 and router.active_blocks("w0") == 0
    assert "w0" not in router.in_flight


def test_router_temperature_samples_by_softmax_of_normalised_costs():
    prompt = tokens(1, 10)
    chain = block_hashes(prompt, BS)

    def shares(temperature: float, n: int = 4000) -> dict[str, float]:
        router = KvRouter(block_size=BS, temperature=temperature, seed=42)
        router.index.apply("w0", stored(chain))  # cost 0
        router.index.apply("w1", stored(chain[:5]))  # cost 5 -> normalised 0.5
        # w2, w3: cost 10 -> normalised 1
        counts = Counter(router.pick("m", four(), prompt)[0].instance_id for _ in range(n))
        return {i: counts[i] / n for i in ("w0", "w1", "w2", "w3")}

    # T = 1: weights e^0, e^-0.5, e^-1, e^-1 -> 0.399, 0.242, 0.147, 0.147.
    got = shares(1.0)
    total = 1 + 2.718281828**-0.5 + 2 * 2.718281828**-1
    for instance, weight in (("w0", 1), ("w1", 2.718281828**-0.5), ("w2", 2.718281828**-1)):
        assert got[instance] == pytest.approx(weight / total, abs=0.03)
    assert got["w3"] == pytest.approx(got["w2"], abs=0.03)
    # Cold: nearly always the cheapest; hot: nearly uniform.
    assert shares(0.05, 1000)["w0"] > 0.99
    assert all(share == pytest.approx(0.25, abs=0.04) for share in shares(100.0).values())
    # Equal costs at any temperature: uniform.
    router = KvRouter(block_size=BS, temperature=1.0, seed=9)
    counts = Counter(router.pick("m", four(), tokens(2, 3))[0].instance_id for _ in range(2000))
    assert all(c / 2000 == pytest.approx(0.25, abs=0.04) for c in counts.values())
    assert len(counts) == 4


def test_router_without_events_routes_a_repeated_prefix_to_the_same_instance():
    clock = FakeClock()
    index = ApproxKvIndex(BS, ttl_s=120.0, clock=clock)
    router = KvRouter(index, block_size=BS, seed=2)
    system = tokens(7, 6)
    first, overlap = router.pick("m", four(), system + tokens(1, 2))
    assert overlap == 0
    for question in range(2, 6):
        chosen, overlap = router.pick("m", four(), system + tokens(question, 2))
        assert chosen.instance_id == first.instance_id and overlap == 6
    # Other documents still spread over the other instances.
    others = {router.pick("m", four(), tokens(50 + d, 8))[0].instance_id for d in range(3)}
    assert first.instance_id not in others and len(others) == 3
    clock.now += 121.0  # the predictions expired: the prefix is cold everywhere again
    _, overlap = router.pick("m", four(), system + tokens(9, 2))
    assert overlap == 0
    # Only that last decision's 8 blocks are predicted now.
    assert sum(index.cached_blocks(r.instance_id) for r in four()) == 8


def test_router_and_index_block_sizes_must_agree():
    with pytest.raises(ValueError):
        KvRouter(KvIndex(16), block_size=32)
    with pytest.raises(ValueError):
        KvRouter(block_size=BS, temperature=-1.0)
    with pytest.raises(ValueError):
        ApproxKvIndex(BS, ttl_s=0)
