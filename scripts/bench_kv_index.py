"""Micro-benchmark of the KV-aware routing core (issue 11): how many overlap lookups and KV
events per second the index sustains in one Python thread, on an index populated like a
busy deployment.

Each instance holds ``--cache-blocks`` blocks: a few of the shared documents (system prompts
of 128 blocks, 2k tokens at 16 tokens a block) held to various depths, and its own
conversations for the rest. Lookups:

- ``walk``: a prompt of B blocks that one instance holds whole and the others hold to
  depths spread over 0..B, so the walk goes to the end and instances drop out along the way
  (the worst case for a lookup);
- ``cold``: a prompt nobody holds (stops at the first block).

Events: ``stored`` and ``removed`` events of ``--event-blocks`` blocks each, applied to the
populated index, one instance after another. ``pick``: a whole KvRouter.pick (hashing the
prompt's tokens, the lookup, the costs) for the ``walk`` prompt, and ``hash`` the hashing
alone, which dominates it.

    .venv/bin/python scripts/bench_kv_index.py [--instances 8,64] [--blocks 64,512]
        [--cache-blocks 4096] [--event-blocks 16] [--seconds 0.2]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from dynamo_run.distributed.kv_index import KvIndex
from dynamo_run.distributed.kv_router import KvRouter
from dynamo_run.distributed.wire import InstanceRecord
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.protocol.internal import KV_REMOVED, KV_STORED, KvCacheEvent

BLOCK_SIZE = 16
DOCUMENTS = 32
DOCUMENT_BLOCKS = 128


def rate(seconds: float, work: Callable[..., int], *args: object) -> float:
    """Operations per CPU second of ``work(*args)`` (which returns how many it did), best of
    5 runs of about ``seconds`` each. CPU time of this process, not wall time, so that other
    jobs on a shared machine do not count; the best run is the least disturbed one."""
    best = 0.0
    for _ in range(5):
        done, start = 0, time.process_time()
        while (elapsed := time.process_time() - start) < seconds:
            done += work(*args)
        best = max(best, done / elapsed)
    return best


def record(instance_id: str) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id, namespace="bench", component="c", endpoint="e",
        subject=f"dyn.bench.c.e.{instance_id}", model="m", engine="mocker", host="h", pid=1,
        card_digest="d", started_at=0.0, updated_at=0.0, lease_s=3.0,
    )  # fmt: skip


def populate(index: KvIndex, ids: list[str], cache_blocks: int, rng: random.Random) -> None:
    documents = [[rng.getrandbits(64) for _ in range(DOCUMENT_BLOCKS)] for _ in range(DOCUMENTS)]
    for instance in ids:
        held = 0
        for document in rng.sample(documents, 8):
            depth = rng.randint(1, DOCUMENT_BLOCKS)
            index.apply(instance, stored(document[:depth]))
            held += depth
        while held < cache_blocks:  # its own conversations, 64 blocks each
            n = min(64, cache_blocks - held)
            index.apply(instance, stored([rng.getrandbits(64) for _ in range(n)]))
            held += n


def stored(hashes: list[int]) -> KvCacheEvent:
    return KvCacheEvent(kind=KV_STORED, block_hashes=hashes, block_size=BLOCK_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", default="8,64")
    parser.add_argument("--blocks", default="64,512")
    parser.add_argument("--cache-blocks", type=int, default=4096)
    parser.add_argument("--event-blocks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.2)
    args = parser.parse_args()
    instance_counts = [int(n) for n in args.instances.split(",")]
    prompt_lengths = [int(n) for n in args.blocks.split(",")]

    print(
        f"block size {BLOCK_SIZE}, {args.cache_blocks} cached blocks per instance; "
        "operations per CPU second, one thread"
    )
    print("| instances | index blocks | what | per CPU second |")
    print("|---|---|---|---|")
    for n in instance_counts:
        rng = random.Random(n)
        ids = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
        index = KvIndex(BLOCK_SIZE)
        populate(index, ids, args.cache_blocks, rng)
        size = len(index)

        def row(what: str, per_second: float, n: int = n, size: int = size) -> None:
            print(f"| {n} | {size} | {what} | {per_second:,.0f} |", flush=True)

        for blocks in prompt_lengths:
            tokens = [rng.randrange(50_000) for _ in range(blocks * BLOCK_SIZE)]
            chain = block_hashes(tokens, BLOCK_SIZE)
            for i, instance in enumerate(ids):
                depth = blocks if i == 0 else blocks * i // n
                index.apply(instance, stored(chain[:depth]))
            overlaps = index.overlaps(chain)
            assert overlaps[ids[0]] == blocks
            cold = [rng.getrandbits(64) for _ in range(blocks)]
            walk = rate(args.seconds, _lookup, index, chain)
            row(f"lookup, {blocks}-block prompt, walk", walk)
            row(f"lookup, {blocks}-block prompt, cold", rate(args.seconds, _lookup, index, cold))
            hashing = rate(args.seconds, _hash, tokens)
            row(f"hash the {blocks}-block prompt (kv_blocks.block_hashes)", hashing)
            router = KvRouter(index, block_size=BLOCK_SIZE)
            records = [record(i) for i in ids]
            picks = rate(args.seconds, _pick, router, records, tokens)
            row(f"KvRouter.pick, {blocks}-block prompt", picks)
            for instance in ids:
                index.remove(instance, chain)

        k = args.event_blocks
        batch = [(ids[j % n], [rng.getrandbits(64) for _ in range(k)]) for j in range(2000)]
        stored_events = [(i, stored(h)) for i, h in batch]
        removed_events = [
            (i, KvCacheEvent(kind=KV_REMOVED, block_hashes=h, block_size=BLOCK_SIZE))
            for i, h in batch
        ]
        store_rate = remove_rate = 0.0
        for _ in range(5):  # store then remove the same 2000 events: the index size holds
            start = time.process_time()
            for instance, event in stored_events:
                index.apply(instance, event)
            middle = time.process_time()
            for instance, event in removed_events:
                index.apply(instance, event)
            end = time.process_time()
            store_rate = max(store_rate, len(batch) / (middle - start))
            remove_rate = max(remove_rate, len(batch) / (end - middle))
        row(f"stored events of {k} blocks applied", store_rate)
        row(f"removed events of {k} blocks applied", remove_rate)


def _lookup(index: KvIndex, chain: list[int]) -> int:
    for _ in range(20):
        index.overlaps(chain)
    return 20


def _hash(tokens: list[int]) -> int:
    block_hashes(tokens, BLOCK_SIZE)
    return 1


def _pick(router: KvRouter, records: list[InstanceRecord], tokens: list[int]) -> int:
    router.pick("m", records, tokens)
    return 1


if __name__ == "__main__":
    main()
