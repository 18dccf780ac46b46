"""vLLM's KV events -> ours (dynamo_run_vllm.kv_events.KvEventMapper), on events shaped like
vLLM's BlockStored / BlockRemoved / AllBlocksCleared: re-hashing in our block size, chains
across events, holder counts, and what a new or replaced sink is told."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dynamo_run.kv_blocks import block_hashes
from dynamo_run.protocol.internal import KV_CLEARED, KV_REMOVED, KV_STORED

kv_events = pytest.importorskip("dynamo_run_vllm.kv_events", reason="dynamo-run-vllm not installed")


@dataclass
class BlockStored:  # the fields of vllm.distributed.kv_events.BlockStored that we read
    block_hashes: list
    parent_block_hash: object
    token_ids: list[int]
    block_size: int


@dataclass
class BlockRemoved:
    block_hashes: list


@dataclass
class AllBlocksCleared:
    pass


@dataclass
class Sink:
    events: list = field(default_factory=list)

    def __call__(self, event) -> None:
        self.events.append(event)


TOKENS = list(range(1000, 1000 + 96))  # three vLLM blocks of 32 tokens


def test_stored_blocks_are_rehashed_in_our_block_size_and_chained() -> None:
    sink = Sink()
    mapper = kv_events.KvEventMapper(block_size=16, sink=sink)
    mapper.apply(BlockStored([b"a", b"b"], None, TOKENS[:64], 32))
    mapper.apply(BlockStored([b"c"], b"b", TOKENS[64:96], 32))
    ours = block_hashes(TOKENS, 16)
    assert [e.kind for e in sink.events] == [KV_STORED, KV_STORED]
    assert sink.events[0].block_hashes == ours[:4] and sink.events[0].parent_hash is None
    assert sink.events[1].block_hashes == ours[4:] and sink.events[1].parent_hash == ours[3]
    assert all(e.block_size == 16 for e in sink.events)


def test_holder_counts_and_removal() -> None:
    sink = Sink()
    mapper = kv_events.KvEventMapper(block_size=16, sink=sink)
    mapper.apply(BlockStored([b"a"], None, TOKENS[:32], 32))
    mapper.apply(BlockStored([b"a", b"b"], None, TOKENS[:64], 32))  # "a" again, then "b"
    ours = block_hashes(TOKENS[:64], 16)
    assert sink.events[1].block_hashes == ours[2:] and sink.events[1].parent_hash == ours[1]
    mapper.apply(BlockRemoved([b"a"]))  # still held once
    assert len(sink.events) == 2
    mapper.apply(BlockRemoved([b"b", b"a", b"unknown"]))
    assert sink.events[2].kind == KV_REMOVED
    assert sink.events[2].block_hashes == [ours[3], ours[2], ours[1], ours[0]]
    assert not mapper.held


def test_orphans_and_misaligned_blocks_are_not_reported() -> None:
    sink = Sink()
    mapper = kv_events.KvEventMapper(block_size=16, sink=sink)
    mapper.apply(BlockStored([b"x"], b"never-seen", TOKENS[:32], 32))
    mapper.apply(BlockStored([b"y"], None, TOKENS[:24], 24))  # 24 is not a multiple of 16
    assert sink.events == [] and mapper.skipped == 2


def test_new_sink_learns_what_is_held_and_old_one_is_cleared() -> None:
    mapper = kv_events.KvEventMapper(block_size=16)
    mapper.apply(BlockStored([b"a", b"b"], None, TOKENS[:64], 32))  # no sink yet
    first = Sink()
    mapper.set_sink(first)
    assert {h for e in first.events for h in e.block_hashes} == set(block_hashes(TOKENS[:64], 16))
    second = Sink()
    mapper.set_sink(second)
    assert first.events[-1].kind == KV_CLEARED
    mapper.apply(AllBlocksCleared())
    assert second.events[-1].kind == KV_CLEARED and not mapper.held
