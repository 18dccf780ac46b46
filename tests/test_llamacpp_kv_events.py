"""KV events of the llamacpp engine: replayed, they give exactly the blocks its slots and its
prompt cache hold, and they agree with the ``cached_tokens`` the engine then reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from dynamo_run_llamacpp import create_engine
from dynamo_run_llamacpp.engine import LlamaCppEngine
from dynamo_run_llamacpp.kv_events import KvTracker

from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.model.card import ModelCard, load_model_card
from dynamo_run.protocol.internal import (
    KV_CLEARED,
    KV_REMOVED,
    KV_STORED,
    EngineOutput,
    KvCacheEvent,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)

GREEDY = SamplingOptions(temperature=0.0)


class Replay:
    """A KV event sink that replays the events into the set of held block hashes, checking
    that they are exact: a block is stored only when not held, after its parent (which is
    held), and removed only when held."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.events: list[KvCacheEvent] = []  # appended on the scheduler thread
        self.applied = 0
        self.held: set[int] = set()
        self.parent: dict[int, int | None] = {}
        self.counts = {KV_STORED: 0, KV_REMOVED: 0, KV_CLEARED: 0}

    def __call__(self, event: KvCacheEvent) -> None:
        self.events.append(event)

    def state(self) -> set[int]:
        """Apply the events received since the last call; the held hashes."""
        while self.applied < len(self.events):
            event = self.events[self.applied]
            self.applied += 1
            assert event.block_size == self.block_size
            self.counts[event.kind] += 1
            if event.kind == KV_STORED:
                assert event.block_hashes
                parent = event.parent_hash
                assert parent is None or parent in self.held, "stored before its parent"
                for block_hash in event.block_hashes:
                    assert block_hash not in self.held, "stored twice"
                    self.held.add(block_hash)
                    self.parent[block_hash] = parent
                    parent = block_hash
            elif event.kind == KV_REMOVED:
                assert event.block_hashes
                for block_hash in event.block_hashes:
                    assert block_hash in self.held, "removed but not held"
                    self.held.remove(block_hash)
            else:
                assert event.kind == KV_CLEARED
                self.held.clear()
        # What an engine holds is closed under prefixes: a slot or a saved prompt holding a
        # block holds every block before it.
        for block_hash in self.held:
            assert self.parent[block_hash] is None or self.parent[block_hash] in self.held
        return set(self.held)

    def leading_blocks(self, token_ids: list[int]) -> int:
        """How many leading blocks of a prompt the events say the engine holds."""
        held = self.state()
        n = 0
        for block_hash in block_hashes(token_ids, self.block_size):
            if block_hash not in held:
                break
            n += 1
        return n


def engine_holds(eng: LlamaCppEngine) -> tuple[set[int], set[int] | None]:
    """From the scheduler thread, between steps: the hashes of the full blocks of every
    slot's tokens and every prompt-cache entry's tokens, computed from scratch; and the
    hashes the engine's tracker counts (None without a sink)."""
    s = eng.scheduler
    bs = eng.kv_block_size

    def collect() -> tuple[set[int], set[int] | None]:
        held: set[int] = set()
        for slot in s.slots:
            held.update(block_hashes(slot.tokens[: slot.n].tolist(), bs))
        for entry in s.prompt_cache.entries() if s.prompt_cache else ():
            held.update(block_hashes(entry.tokens.tolist(), bs))
        return held, None if s.kv is None else set(s.kv.refs)

    return s.call(collect).result(timeout=30)


def assert_replay_exact(eng: LlamaCppEngine, replay: Replay) -> set[int]:
    truth, tracked = engine_holds(eng)  # also waits until earlier events were sent
    assert tracked == truth
    assert replay.state() == truth
    return truth


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_model_card(None)


def chat_ids(card: ModelCard, question: str) -> list[int]:
    prompt = card.chat_template.render([{"role": "user", "content": question}])
    return card.tokenizer.encode(prompt, add_special_tokens=False).ids


def request(ids: list[int], max_tokens: int = 8, ignore_eos: bool = False) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="kv",
        token_ids=ids,
        sampling=GREEDY,
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=ignore_eos),
    )


async def _collect(eng: LlamaCppEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in eng.generate(req)]


def serve(
    eng: LlamaCppEngine, ids: list[int], max_tokens: int = 8, ignore_eos: bool = False
) -> int:
    """Run one request to its end; its cached_tokens."""
    outs = asyncio.run(_collect(eng, request(ids, max_tokens, ignore_eos)))
    assert outs[-1].finish_reason is not None and outs[-1].error is None
    return outs[0].cached_tokens


def settle(eng: LlamaCppEngine) -> None:
    """Wait until cancelled requests are gone (noticed at the scheduler's next turn)."""
    deadline = time.monotonic() + 5
    while eng.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.in_flight == 0


# --- the tracker alone ------------------------------------------------------------------


def test_tracker_counts_holders() -> None:
    replay = Replay(4)
    kv = KvTracker(4, replay)
    a = block_hashes(list(range(12)), 4)  # 3 blocks
    b = block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4)  # shares a's first block
    slot1: list[int] = []
    kv.hold(a, None)  # a prompt-cache entry holding a
    assert replay.state() == set(a) and replay.counts[KV_STORED] == 1
    kv.extend(slot1, np.arange(14, dtype=np.int32))  # a slot: a's 3 blocks, plus 2 tokens
    assert slot1 == a and replay.counts[KV_STORED] == 1  # nothing new
    kv.truncate(slot1, 6)  # the slot keeps a's first block only: the entry holds the rest
    assert slot1 == a[:1] and replay.counts[KV_REMOVED] == 0
    kv.replace(slot1, b)  # b loaded over it: only b's second block is new, after a[0]
    assert replay.events[-1].block_hashes == b[1:] and replay.events[-1].parent_hash == a[0]
    kv.release(a)  # the entry goes: a's blocks but the shared first one are removed
    assert replay.events[-1].kind == KV_REMOVED
    assert replay.events[-1].block_hashes == [a[2], a[1]]  # the chain's end first
    assert replay.state() == set(b) == set(kv.refs)
    kv.clear()
    assert replay.state() == set() and not kv.refs


@pytest.mark.model
def test_bad_block_size(card: ModelCard) -> None:
    with pytest.raises(EngineError, match="block size"):
        create_engine(card, EngineConfig(kv_cache_block_size=0))


# --- the engine -------------------------------------------------------------------------


@pytest.fixture
def small_engine(card: ModelCard) -> Iterator[LlamaCppEngine]:
    """Two slots of 256 tokens, a prompt cache of 2 MiB (about 90 tokens of SmolLM2's KV,
    so it evicts) and blocks of 8 tokens, so that short prompts make several blocks."""
    extra = {"n_parallel": 2, "n_threads": 1, "n_ctx": 512, "prompt_cache_mib": 2}
    eng = create_engine(card, EngineConfig(kv_cache_block_size=8, extra=extra))
    yield eng
    asyncio.run(eng.close())


@pytest.mark.model
def test_no_sink_no_hashes(small_engine: LlamaCppEngine, card: ModelCard) -> None:
    eng = small_engine
    serve(eng, chat_ids(card, "Name a color of the rainbow."))
    serve(eng, chat_ids(card, "Name a planet of the solar system."))
    assert eng.scheduler.kv is None and eng.stats()["kv_blocks_held"] is None
    assert all(slot.hashes == [] for slot in eng.scheduler.slots)
    assert all(e.hashes == [] for e in eng.scheduler.prompt_cache.entries())
    # A sink set now is told what the engine already holds.
    replay = Replay(8)
    eng.set_kv_event_sink(replay)
    truth = assert_replay_exact(eng, replay)
    assert truth and replay.counts[KV_STORED] >= 1
    assert eng.stats()["kv_blocks_held"] == len(truth)
    # Unset: the sink is told the engine's blocks are no longer reported; no more events.
    eng.set_kv_event_sink(None)
    assert engine_holds(eng)[1] is None
    assert replay.state() == set() and replay.counts[KV_CLEARED] == 1
    seen = len(replay.events)
    serve(eng, chat_ids(card, "Name a fruit."))
    assert len(replay.events) == seen


QUESTIONS = [
    "Describe a lighthouse on a stormy night.",
    "List the planets of the solar system in order from the sun.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Explain briefly.",
    "Name three prime numbers.",
]


@pytest.mark.model
def test_events_replay_to_what_the_engine_holds(
    small_engine: LlamaCppEngine, card: ModelCard
) -> None:
    """A mixed workload (slot reuse, two slots holding one prompt, requests waiting for a
    slot, cancellation, prompt-cache saves, evictions and restores): after each phase the
    replayed events are exactly the blocks of the slots' and the prompt cache's tokens."""
    eng = small_engine
    assert eng.kv_block_size == 8
    replay = Replay(8)
    eng.set_kv_event_sink(replay)
    prompts = [chat_ids(card, q) for q in QUESTIONS]

    for ids in prompts[:4]:  # one after another: the same slot, reused each time
        # Generated tokens that end exactly on a block boundary (the last one sampled is
        # not decoded): the slot holds len(ids) + max_tokens - 1 tokens, a whole number of
        # blocks, the last of them completed by the last decode step.
        max_tokens = 8 + (1 - len(ids)) % 8
        serve(eng, ids, max_tokens, ignore_eos=True)
        assert (len(ids) + max_tokens - 1) % 8 == 0
        assert set(block_hashes(ids, 8)) <= assert_replay_exact(eng, replay)

    async def together() -> None:  # four requests on two slots, one prompt twice
        await asyncio.gather(*(_collect(eng, request(prompts[i], 12)) for i in (0, 1, 0, 4)))

    asyncio.run(together())
    assert_replay_exact(eng, replay)

    async def twice() -> None:  # one prompt in both slots at once: its blocks, stored once
        await asyncio.gather(*(_collect(eng, request(prompts[2], 4)) for _ in range(2)))

    asyncio.run(twice())
    both = eng.scheduler.call(
        lambda: [slot.tokens[: len(prompts[2])].tolist() for slot in eng.scheduler.slots]
    )
    assert both.result(timeout=30) == [prompts[2], prompts[2]]
    assert_replay_exact(eng, replay)

    async def cancel_one() -> None:
        long = eng.generate(request(prompts[2], 200, ignore_eos=True))
        other = asyncio.ensure_future(_collect(eng, request(prompts[3], 20)))
        got = 0
        async for out in long:
            got += len(out.token_ids)
            if got >= 3:
                break
        await long.aclose()
        await other

    asyncio.run(cancel_one())
    settle(eng)
    assert_replay_exact(eng, replay)

    for i in (1, 2, 4, 1):  # prompts whose states went to the prompt cache come back
        serve(eng, prompts[i])
        assert_replay_exact(eng, replay)

    stats = eng.stats()
    cache = eng.scheduler.prompt_cache
    assert cache.saved >= 3 and cache.restored >= 1 and stats["restored_tokens"] > 0
    assert len(cache) < cache.saved  # entries were evicted (or replaced by longer ones)
    assert replay.counts[KV_REMOVED] >= 1  # slots cut back, entries evicted
    assert stats["kv_blocks_held"] == len(replay.state())

    asyncio.run(eng.close())
    assert replay.state() == set() and replay.counts[KV_CLEARED] == 1
    assert replay.events[-1].kind == KV_CLEARED


def padded(card: ModelCard, question: str, multiple: int) -> str:
    """``question`` with words added until its chat prompt's length is a multiple."""
    for _ in range(multiple):
        if len(chat_ids(card, question)) % multiple == 0:
            return question
        question += " Please"
    raise AssertionError("no padding gives a whole number of blocks")


@pytest.mark.model
def test_events_match_cached_tokens(card: ModelCard) -> None:
    """What the events say a worker holds is what the engine then reuses: for each request,
    the leading blocks of its prompt held before it (H) and the cached_tokens it reports (c)
    satisfy c // 16 == H, or H - 1 when the held blocks cover the whole prompt (its length
    a multiple of 16): llama.cpp decodes the last prompt token again for its logits, so c is
    at most len(prompt) - 1. Checked with A's slot reused by other prompts and A restored
    from the prompt cache."""
    eng = create_engine(card, EngineConfig(extra={"n_parallel": 1, "n_threads": 1}))
    bs = eng.kv_block_size
    assert bs == 16
    replay = Replay(bs)
    eng.set_kv_event_sink(replay)

    def relation(ids: list[int]) -> tuple[int, int]:
        held = replay.leading_blocks(ids)
        cached = serve(eng, ids)
        assert cached // bs <= held
        whole = held * bs == len(ids)
        assert cached // bs == held - whole, (len(ids), held, cached)
        assert_replay_exact(eng, replay)
        return held, cached

    question = padded(card, "Describe a lighthouse on a stormy night.", bs)
    a = chat_ids(card, question)
    b = chat_ids(card, question + " Then a ship.")
    c = chat_ids(card, "List the planets of the solar system in order from the sun.")
    d = chat_ids(card, "Write a haiku about the sea.")
    try:
        assert relation(a) == (0, 0)
        assert set(block_hashes(a, bs)) <= replay.state()  # A's full blocks are stored
        assert relation(a) == (len(a) // bs, len(a) - 1)  # all held, the last token again
        held, cached = relation(b)  # a shared prefix that ends inside a block
        assert held >= 2 and cached % bs
        assert relation(c)[0] == 1  # the shared template head: one block and a bit
        restored = eng.stats()["restored_tokens"]
        held, cached = relation(d)
        assert held == 1 and cached == 24
        # A's slot was reused three times: A comes back from the prompt cache.
        assert relation(a) == (len(a) // bs, len(a) - 1)
        assert eng.stats()["restored_tokens"] - restored == len(a) - 1
        # A prompt that extends A: all of A is reused, and held in whole blocks.
        follow = a + card.tokenizer.encode(" And now a poem.").ids
        held, cached = relation(follow)
        assert held == len(a) // bs and cached == len(a)
    finally:
        asyncio.run(eng.close())
    assert replay.state() == set()
