"""out=mocker: the block pool, the deterministic tokens, the scheduler's timing, batching
and cancellation, KV events, its settings, and the CLI and HTTP server running it."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import run_cli
from http_helpers import MODEL_NAME, Server, start_server

from dynamo_run.engine import EngineConfig, EngineError, load_engine_factory
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.mocker import create_engine
from dynamo_run.mocker.block_pool import BlockPool, PoolExhausted
from dynamo_run.mocker.config import MockerSettings, parse_settings
from dynamo_run.mocker.engine import MockerEngine
from dynamo_run.mocker.tokens import word_token_ids
from dynamo_run.protocol.internal import (
    FINISH_ERROR,
    FINISH_LENGTH,
    KV_CLEARED,
    KV_REMOVED,
    KV_STORED,
    EngineOutput,
    KvCacheEvent,
    PreprocessedRequest,
    StopConditions,
)

WORDS = re.compile(r"( [A-Za-z]+)+")
INSTANT = {"speedup_ratio": 1e6}


def mocker(card, block_size: int | None = None, **extra: object) -> MockerEngine:
    engine = create_engine(card, EngineConfig(kv_cache_block_size=block_size, extra=extra))
    assert isinstance(engine, MockerEngine)
    return engine


def request(tokens: list[int], max_tokens: int | None, **stop: object) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r", token_ids=list(tokens), stop=StopConditions(max_tokens=max_tokens, **stop)
    )


async def run(engine: MockerEngine, tokens: list[int], max_tokens: int) -> list[EngineOutput]:
    return [out async for out in engine.generate(request(tokens, max_tokens))]


def generated(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def prompt(card, text: str) -> list[int]:
    return card.tokenizer.encode(text, add_special_tokens=False).ids


# --- the block pool ------------------------------------------------------------------------
class Recorder:
    """A KV event sink that replays events into the set of cached hashes."""

    def __init__(self) -> None:
        self.events: list[KvCacheEvent] = []
        self.cached: set[int] = set()

    def __call__(self, event: KvCacheEvent) -> None:
        self.events.append(event)
        if event.kind == KV_STORED:
            assert event.parent_hash is None or event.parent_hash in self.cached
            assert not self.cached & set(event.block_hashes), "stored twice"
            self.cached.update(event.block_hashes)
        elif event.kind == KV_REMOVED:
            assert set(event.block_hashes) <= self.cached, "removed what was not stored"
            self.cached.difference_update(event.block_hashes)
        else:
            assert event.kind == KV_CLEARED
            self.cached.clear()


def store(pool: BlockPool, tokens: list[int]) -> list[int]:
    """A sequence computes ``tokens``: pin its cached prefix, store the rest; returns its
    chain (still pinned)."""
    chain = block_hashes(tokens, pool.block_size)
    hit = pool.cached_prefix(chain)
    pool.acquire(chain[:hit], len(chain) - hit)
    pool.commit(chain[hit:], chain[hit - 1] if hit else None)
    return chain


def test_pool_reuses_a_shared_prefix():
    sink = Recorder()
    pool = BlockPool(16, 4, sink)
    a = store(pool, list(range(12)))  # 3 blocks
    b_tokens = [*range(8), 100, 101, 102, 103]  # same first 2 blocks, then its own
    b_chain = block_hashes(b_tokens, 4)
    assert b_chain[:2] == a[:2] and b_chain[2] != a[2]
    assert pool.cached_prefix(b_chain) == 2
    b = store(pool, b_tokens)
    assert [pool.ref_count(h) for h in a] == [2, 2, 1]
    assert pool.ref_count(b[2]) == 1
    assert pool.used == 4 and pool.free == 12
    # b's store event names only its new block, after the shared prefix.
    assert sink.events[-1] == KvCacheEvent(KV_STORED, [b[2]], a[1], 4)
    assert sink.cached == pool.cached_hashes()


def test_pool_diverging_chains_are_different_blocks_even_with_equal_tokens():
    pool = BlockPool(16, 4)
    x = store(pool, [1, 2, 3, 4, 9, 9, 9, 9])
    y = store(pool, [5, 6, 7, 8, 9, 9, 9, 9])
    # Same tokens in block 1, different prefixes: chained hashes keep them apart.
    assert x[1] != y[1]
    assert pool.cached_hashes() == {*x, *y}
    # A third prompt that starts like x then diverges reuses x's first block only.
    assert pool.cached_prefix(block_hashes([1, 2, 3, 4, 9, 9, 9, 0], 4)) == 1


def test_pool_evicts_idle_blocks_least_recently_released_first_tail_first():
    sink = Recorder()
    pool = BlockPool(4, 2, sink)
    a = store(pool, [1, 2, 3, 4])
    b = store(pool, [5, 6, 7, 8])
    pool.release(a, 0)
    pool.release(b, 0)
    assert pool.used == 0 and pool.free == 0 and pool.available == 4
    assert pool.idle_hashes() == [a[1], a[0], b[1], b[0]]
    pool.acquire([], 1)  # room for one block: the tail of the oldest chain goes
    assert sink.events[-1] == KvCacheEvent(KV_REMOVED, [a[1]], None, 2)
    pool.acquire([], 2)
    assert sink.events[-1].block_hashes == [a[0], b[1]]
    assert pool.cached_hashes() == {b[0]} == sink.cached


def test_pool_reusing_an_idle_block_makes_it_recent_again():
    pool = BlockPool(4, 2)
    a = store(pool, [1, 2])
    b = store(pool, [3, 4])
    pool.release(a, 0)
    pool.release(b, 0)
    again = store(pool, [1, 2])  # a is pinned again, then released after b
    pool.release(again, 0)
    assert pool.idle_hashes() == [b[0], a[0]]


def test_pool_never_evicts_pinned_blocks_and_refuses_what_does_not_fit():
    sink = Recorder()
    pool = BlockPool(3, 2, sink)
    a = store(pool, [1, 2, 3, 4])  # 2 pinned blocks
    assert not pool.can_acquire([], 2)
    with pytest.raises(PoolExhausted):
        pool.acquire([], 2)
    assert pool.cached_hashes() == set(a) and pool.used == 2  # nothing changed
    pool.acquire([], 1)  # the one free block
    assert [pool.ref_count(h) for h in a] == [1, 1]
    assert not any(e.kind == KV_REMOVED for e in sink.events)


def test_pool_deduplicates_a_block_two_sequences_computed_at_once():
    sink = Recorder()
    pool = BlockPool(8, 2, sink)
    chain = block_hashes([1, 2, 3, 4], 2)
    pool.acquire([], 2)
    pool.acquire([], 2)
    pool.commit(chain, None)
    pool.commit(chain, None)  # the second sequence finds them cached: pins, frees its own
    assert [pool.ref_count(h) for h in chain] == [2, 2]
    assert pool.used == 2 and pool.free == 6
    assert [e.kind for e in sink.events] == [KV_STORED]


# --- tokens ----------------------------------------------------------------------------
def test_word_tokens_decode_to_a_space_and_letters(default_card):
    words = word_token_ids(default_card.tokenizer, exclude=default_card.eos_token_ids)
    assert len(words) > 1000
    texts = default_card.tokenizer.decode_batch([[w] for w in words[::50]])
    assert all(re.fullmatch(r" [A-Za-z]+", t) for t in texts)
    assert not set(words) & set(default_card.eos_token_ids)


def test_same_prompt_gives_the_same_readable_words_and_ends_at_max_tokens(default_card):
    ids = prompt(default_card, "The quick brown fox")

    async def scenario():
        engine = mocker(default_card, **INSTANT)
        first = await run(engine, ids, 12)
        second = await run(engine, ids, 12)
        other = await run(engine, [*ids, ids[0]], 12)
        await engine.close()
        return first, second, other

    first, second, other = asyncio.run(scenario())
    assert generated(first) == generated(second)
    assert generated(first) != generated(other)
    assert len(generated(first)) == 12
    assert [o.finish_reason for o in first] == [None] * 11 + [FINISH_LENGTH]
    assert WORDS.fullmatch(default_card.tokenizer.decode(generated(first)))


def test_continuation_on_another_instance_yields_the_rest_of_the_answer(default_card):
    ids = prompt(default_card, "Tell me a story about a lighthouse")

    async def scenario():
        one, two = mocker(default_card, **INSTANT), mocker(default_card, **INSTANT)
        whole = generated(await run(one, ids, 20))
        tail = generated(await run(two, ids + whole[:7], 13))
        await one.close()
        await two.close()
        return whole, tail

    whole, tail = asyncio.run(scenario())
    assert tail == whole[7:]


def test_stop_tokens_and_ignore_eos_change_nothing(default_card):
    ids = prompt(default_card, "Hello")

    async def scenario():
        engine = mocker(default_card, **INSTANT)
        plain = generated(await run(engine, ids, 8))
        req = request(ids, 8, stop_token_ids=default_card.eos_token_ids, min_tokens=3)
        stopped = generated([o async for o in engine.generate(req)])
        await engine.close()
        return plain, stopped

    plain, stopped = asyncio.run(scenario())
    assert plain == stopped


def test_without_max_tokens_it_fills_the_context(default_card):
    async def scenario():
        engine = create_engine(default_card, EngineConfig(context_length=40, extra=INSTANT))
        outputs = [o async for o in engine.generate(request(list(range(30, 60)), None))]
        await engine.close()
        return outputs

    outputs = asyncio.run(scenario())
    assert len(generated(outputs)) == 10 and outputs[-1].finish_reason == FINISH_LENGTH


# --- prefix reuse ----------------------------------------------------------------------
def test_a_repeated_prompt_reports_its_cached_prefix(default_card):
    ids = list(range(1000, 1040))  # 40 tokens: 2 full blocks of 16 and a partial one

    async def scenario():
        engine = mocker(default_card, **INSTANT)
        first = await run(engine, ids, 4)
        second = await run(engine, ids, 4)
        exact = await run(engine, ids[:32], 4)  # the last token is always computed
        await engine.close()
        return first, second, exact

    first, second, exact = asyncio.run(scenario())
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens == 32
    assert exact[0].cached_tokens == 16
    assert all(o.cached_tokens is None for o in second[1:])


def test_generated_tokens_fill_blocks_that_a_follow_up_reuses(default_card):
    ids = list(range(2000, 2016))  # exactly one block

    async def scenario():
        engine = mocker(default_card, **INSTANT)
        answer = generated(await run(engine, ids, 17))  # KV of 16 + 16 tokens: 2 blocks
        blocks = engine.pool.cached_hashes()
        follow_up = await run(engine, ids + answer + [7, 8, 9], 2)
        await engine.close()
        return answer, blocks, follow_up

    answer, blocks, follow_up = asyncio.run(scenario())
    assert blocks == set(block_hashes(ids + answer[:16], 16))
    assert follow_up[0].cached_tokens == 32


def test_block_size_comes_from_the_flag(default_card):
    ids = list(range(3000, 3040))

    async def scenario():
        engine = mocker(default_card, block_size=8, **INSTANT)
        await run(engine, ids, 1)
        again = await run(engine, ids, 1)
        await engine.close()
        return engine, again

    engine, again = asyncio.run(scenario())
    assert engine.pool.block_size == 8
    assert again[0].cached_tokens == 32  # 39 reusable tokens -> 4 blocks of 8


# --- timing and batching ---------------------------------------------------------------
async def timed(engine: MockerEngine, tokens: list[int], max_tokens: int) -> list[float]:
    """Arrival time of every output, from the call."""
    start = time.perf_counter()
    return [time.perf_counter() - start async for _ in engine.generate(request(tokens, max_tokens))]


def test_prefill_takes_the_configured_time_per_uncached_token(default_card):
    # 2 ms per token sped up 2x: 200 uncached tokens take 200 ms, 8 uncached take 8 ms.
    ids = list(range(4000, 4200))
    settings = {"prefill_ms_per_token": 2.0, "decode_ms_base": 0, "decode_ms_per_seq": 0}

    async def scenario():
        engine = mocker(default_card, speedup_ratio=2.0, **settings)
        cold = await timed(engine, ids, 1)
        warm = await timed(engine, ids, 1)
        await engine.close()
        return cold[0], warm[0]

    cold, warm = asyncio.run(scenario())
    assert 0.19 <= cold < 0.35
    assert warm < 0.06


def test_a_batch_decodes_together_each_step_slower_than_one_sequence(default_card):
    # Sped up 2x: a step is 10 ms + 2.5 ms per sequence.
    settings = {"decode_ms_base": 20.0, "decode_ms_per_seq": 5.0, "prefill_ms_per_token": 0}
    steps = 10

    async def scenario():
        engine = mocker(default_card, speedup_ratio=2.0, **settings)
        single = await timed(engine, list(range(10, 30)), steps)
        batch = await asyncio.gather(
            *(timed(engine, list(range(i * 100, i * 100 + 20)), steps) for i in range(1, 5))
        )
        await engine.close()
        return single, batch

    single, batch = asyncio.run(scenario())
    single_step = single[-1] / steps  # expected 12.5 ms
    batch_total = max(times[-1] for times in batch)  # expected 10 steps of 20 ms
    batch_step = batch_total / steps
    assert 0.012 <= single_step < 0.025
    assert batch_step > 1.3 * single_step  # each step of 4 costs more than a step of 1
    assert batch_total < 0.6 * 4 * single[-1]  # but 4 together beat 4 one after another
    assert all(len(times) == steps for times in batch)


def test_requests_beyond_max_num_seqs_wait_in_the_queue(default_card):
    async def scenario():
        engine = mocker(default_card, max_num_seqs=2, decode_ms_base=5.0, speedup_ratio=1.0)
        tasks = [
            asyncio.create_task(timed(engine, list(range(i * 50, i * 50 + 20)), 20))
            for i in range(1, 5)
        ]
        await asyncio.sleep(0.012)
        load = engine.load()
        times = await asyncio.gather(*tasks)
        idle = engine.load()
        await engine.close()
        return load, times, idle

    load, times, idle = asyncio.run(scenario())
    assert (load.in_flight, load.slots_busy, load.slots_total) == (4, 2, 2)
    first_two_done = max(t[-1] for t in times[:2])
    assert min(t[0] for t in times[2:]) >= first_two_done
    assert (idle.in_flight, idle.slots_busy, idle.kv_blocks_used) == (0, 0, 0)


def test_a_request_larger_than_the_pool_fails_clearly(default_card):
    async def scenario():
        engine = mocker(default_card, num_gpu_blocks=4, block_size=4, **INSTANT)
        outputs = await run(engine, list(range(10)), 11)  # KV of 20 tokens: 5 blocks
        await engine.close()
        return outputs, engine

    outputs, engine = asyncio.run(scenario())
    assert len(outputs) == 1 and outputs[0].finish_reason == FINISH_ERROR
    assert "needs 5 KV blocks" in outputs[0].error and "num_gpu_blocks" in outputs[0].error
    assert engine.in_flight == 0


def test_a_request_waits_while_the_pool_is_full(default_card):
    async def scenario():
        engine = mocker(
            default_card, num_gpu_blocks=4, block_size=4, watermark=0, decode_ms_base=20.0
        )
        a = asyncio.create_task(timed(engine, list(range(100, 108)), 5))  # 3 blocks
        await asyncio.sleep(0)
        b = asyncio.create_task(timed(engine, list(range(200, 208)), 5))  # 3 more: must wait
        await asyncio.sleep(0.01)
        load = engine.load()
        a_times, b_times = await asyncio.gather(a, b)
        await engine.close()
        return load, a_times, b_times

    load, a_times, b_times = asyncio.run(scenario())
    assert (load.in_flight, load.slots_busy, load.kv_blocks_used) == (2, 1, 3)
    assert b_times[0] >= a_times[-1]
    assert len(b_times) == 5


# --- cancellation ----------------------------------------------------------------------
def test_closing_the_stream_leaves_the_batch_and_unpins_blocks(default_card):
    ids = list(range(500, 540))

    async def scenario():
        engine = mocker(default_card, decode_ms_base=2.0)
        stream = engine.generate(request(ids, 1000))
        await stream.__anext__()
        await stream.__anext__()
        busy = engine.load()
        await stream.aclose()
        after = engine.load()
        idle = engine.pool.idle_hashes()
        await engine.close()
        return busy, after, idle

    busy, after, idle = asyncio.run(scenario())
    assert (busy.in_flight, busy.slots_busy) == (1, 1)
    assert busy.kv_blocks_used == -(-(40 + 999) // 16)  # the whole sequence is reserved
    assert (after.in_flight, after.slots_busy, after.kv_blocks_used) == (0, 0, 0)
    assert set(idle) == set(block_hashes(ids, 16))  # still cached, evictable


def test_cancelling_the_task_frees_a_running_and_a_queued_request(default_card):
    async def scenario():
        engine = mocker(default_card, max_num_seqs=1, decode_ms_base=2.0)

        async def consume(start: int) -> None:
            async for _ in engine.generate(request(list(range(start, start + 20)), 1000)):
                pass

        running = asyncio.create_task(consume(0))
        queued = asyncio.create_task(consume(100))
        await asyncio.sleep(0.02)
        busy = engine.load()
        queued.cancel()
        running.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        after = engine.load()
        waiting = len(engine.scheduler.waiting)
        await engine.close()
        return busy, after, waiting

    busy, after, waiting = asyncio.run(scenario())
    assert (busy.in_flight, busy.slots_busy) == (2, 1)
    assert (after.in_flight, after.slots_busy, after.kv_blocks_used, waiting) == (0, 0, 0, 0)


# --- KV events -------------------------------------------------------------------------
def test_kv_events_replay_to_exactly_the_pool_contents(default_card):
    sink = Recorder()

    async def scenario():
        engine = mocker(default_card, num_gpu_blocks=24, block_size=4, max_num_seqs=3, **INSTANT)
        engine.set_kv_event_sink(sink)
        shared = list(range(700, 712))
        prompts = [[*shared, i, i + 1, i + 2, i + 3, i + 4] for i in range(0, 60, 5)]
        await asyncio.gather(*(run(engine, p, 6) for p in prompts))
        await run(engine, prompts[0], 6)
        before_close = (set(sink.cached), engine.pool.cached_hashes())
        await engine.close()
        return before_close

    replayed, pool = asyncio.run(scenario())
    assert replayed == pool and pool
    kinds = {e.kind for e in sink.events}
    assert {KV_STORED, KV_REMOVED} <= kinds  # the small pool had to evict
    assert all(e.block_size == 4 for e in sink.events)
    assert sink.events[-1].kind == KV_CLEARED and not sink.cached


def test_many_requests_with_cancellations_leave_consistent_accounting(default_card):
    rng = random.Random(7)
    sink = Recorder()

    async def one(engine: MockerEngine, tokens: list[int], stop_after: int | None) -> None:
        stream = engine.generate(request(tokens, 12))
        seen = 0
        async for _ in stream:
            seen += 1
            if stop_after is not None and seen >= stop_after:
                await stream.aclose()
                break

    async def scenario():
        engine = mocker(default_card, num_gpu_blocks=40, block_size=4, max_num_seqs=5, **INSTANT)
        engine.set_kv_event_sink(sink)
        prefixes = [list(range(b, b + 8)) for b in (0, 100, 200)]
        jobs = []
        for _ in range(40):
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(9))]
            jobs.append(one(engine, tokens, rng.choice([None, 1, 3, 6])))
        await asyncio.gather(*jobs)
        state = (engine.load(), engine.pool.free, engine.pool.cached_hashes(), set(sink.cached))
        await engine.close()
        return state

    load, free, cached, replayed = asyncio.run(scenario())
    assert (load.in_flight, load.slots_busy, load.kv_blocks_used) == (0, 0, 0)
    assert free + len(cached) == 40
    assert replayed == cached
    assert any(e.kind == KV_REMOVED for e in sink.events)  # the pool was under pressure


def test_a_failing_event_sink_does_not_stop_the_engine(default_card):
    def broken(event: KvCacheEvent) -> None:
        raise RuntimeError("listener bug")

    async def scenario():
        engine = mocker(default_card, **INSTANT)
        engine.set_kv_event_sink(broken)
        outputs = await run(engine, list(range(64)), 20)
        await engine.close()
        return outputs

    assert asyncio.run(scenario())[-1].finish_reason == FINISH_LENGTH


def test_close_ends_waiting_and_running_requests(default_card):
    async def scenario():
        engine = mocker(default_card, max_num_seqs=1, decode_ms_base=2.0)

        async def consume(start: int) -> EngineOutput:
            outputs = [
                o async for o in engine.generate(request(list(range(start, start + 8)), 500))
            ]
            return outputs[-1]

        tasks = [asyncio.create_task(consume(s)) for s in (0, 100)]
        await asyncio.sleep(0.01)
        await engine.close()
        return await asyncio.gather(*tasks), engine

    (last_a, last_b), engine = asyncio.run(scenario())
    assert last_a.finish_reason == last_b.finish_reason == FINISH_ERROR
    assert engine.in_flight == 0 and engine.pool.cached_hashes() == set()


# --- settings --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"speedup": 10}, "unknown engine argument(s) 'speedup' (did you mean 'speedup_ratio'?)"),
        ({"max_num_seq": 4}, "(did you mean 'max_num_seqs'?)"),
        ({"num_gpu_blocks": "100"}, "'num_gpu_blocks' must be an integer, got '100'"),
        ({"max_num_seqs": True}, "'max_num_seqs' must be an integer"),
        ({"block_size": 0}, "'block_size' must be >= 1"),
        ({"speedup_ratio": 0}, "'speedup_ratio' must be > 0"),
        ({"speedup_ratio": "fast"}, "'speedup_ratio' must be a number"),
        ({"decode_ms_base": -1}, "'decode_ms_base' must be >= 0"),
        ({"watermark": 1.5}, "'watermark' must be in [0, 1)"),
    ],
)
def test_bad_engine_arguments_are_refused_clearly(extra, message):
    with pytest.raises(EngineError) as err:
        parse_settings(EngineConfig(extra=extra))
    assert message in str(err.value)
    assert str(err.value).startswith("mocker: ")


def test_settings_defaults_and_the_block_size_flag():
    assert parse_settings(EngineConfig()) == MockerSettings()
    assert MockerSettings().block_size == 16 and MockerSettings().num_gpu_blocks == 16384
    flagged = parse_settings(EngineConfig(kv_cache_block_size=32, extra={"speedup_ratio": 5}))
    assert (flagged.block_size, flagged.speedup_ratio) == (32, 5.0)
    assert parse_settings(EngineConfig(16, 8, {"block_size": 8})).block_size == 8
    with pytest.raises(EngineError, match="disagrees with --kv-cache-block-size"):
        parse_settings(EngineConfig(kv_cache_block_size=32, extra={"block_size": 8}))


def test_mocker_is_a_registered_engine(default_card):
    factory = load_engine_factory("mocker")
    assert factory is create_engine


# --- end to end ------------------------------------------------------------------------
def test_cli_single_shot_prints_words(engine_args):
    result = run_cli(
        "out=mocker",
        "-p",
        "hi",
        "--extra-engine-args",
        engine_args(speedup_ratio=1e6),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\s*[A-Za-z]+( [A-Za-z]+)+\s*", result.stdout)


def test_cli_refuses_an_unknown_engine_argument(engine_args):
    result = run_cli("out=mocker", "-p", "hi", "--extra-engine-args", engine_args(num_gpu_block=8))
    assert result.returncode == 1
    assert "did you mean 'num_gpu_blocks'?" in result.stderr


@pytest.fixture(scope="module", name="mocker_server")
def mocker_server_fixture() -> Iterator[Server]:
    yield from start_server(out="mocker", engine_args={"speedup_ratio": 1e4})


def test_http_server_with_the_openai_client(mocker_server):
    client = openai.OpenAI(base_url=mocker_server.url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Say something about the sea " * 4}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12)
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12)
    assert first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 12
    assert WORDS.fullmatch(" " + first.choices[0].message.content.strip())
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0

    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == first.choices[0].message.content


def test_logprobs_report_a_certain_choice(default_card):
    async def scenario():
        engine = mocker(default_card, **INSTANT)
        req = PreprocessedRequest(
            request_id="lp", token_ids=[1, 2, 3], stop=StopConditions(max_tokens=3), logprobs=2
        )
        outputs = [o async for o in engine.generate(req)]
        await engine.close()
        return outputs

    for out in asyncio.run(scenario()):
        [lp] = out.logprobs
        assert (lp.token_id, lp.logprob, lp.top) == (out.token_ids[0], 0.0, [(lp.token_id, 0.0)])
