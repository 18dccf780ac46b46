"""The vllm engine in-process with real vLLM (its CPU build) and the default model as an
HF folder: answers, sampling options, logprobs, guided JSON, cancellation freeing vLLM's
request, live load, and vLLM's own KV events re-hashed into ours."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_helpers import CONTEXT, hf_folder, needs_vllm

from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.protocol.internal import (
    FINISH_LENGTH,
    FINISH_STOP,
    KV_CLEARED,
    KV_REMOVED,
    KV_STORED,
    KvCacheEvent,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)

__all__ = ["hf_folder"]  # the fixture, imported for pytest

pytestmark = [needs_vllm, pytest.mark.slow, pytest.mark.timeout(900)]


class Loop:
    """One event loop on a thread for the module: the engine's AsyncLLM binds its output
    handler to the loop of its first request, so every test must use the same loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def card(hf_folder: Path):
    from dynamo_run.model.card import load_model_card

    return load_model_card(str(hf_folder), context_length=CONTEXT)


@pytest.fixture(scope="module")
def engine(card) -> Iterator:
    from dynamo_run_vllm import create_engine

    loop = Loop()
    eng = loop.run(
        asyncio.to_thread(create_engine, card, EngineConfig(context_length=CONTEXT)), 600
    )
    eng.test_loop = loop
    yield eng
    loop.run(eng.close())
    loop.close()


def chat_ids(card, text: str) -> list[int]:
    prompt = card.chat_template.render([{"role": "user", "content": text}])
    return card.tokenizer.encode(prompt, add_special_tokens=False).ids


def request(ids: list[int], **kw) -> PreprocessedRequest:
    sampling = SamplingOptions(**kw.pop("sampling", {}))
    stop = StopConditions(**kw.pop("stop", {}))
    return PreprocessedRequest(
        request_id=kw.pop("request_id", "t"), token_ids=ids, sampling=sampling, stop=stop, **kw
    )


def run(engine, req: PreprocessedRequest) -> list:
    async def collect():
        return [out async for out in engine.generate(req)]

    return engine.test_loop.run(collect())


def tokens(outputs: list) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def test_greedy_answer_is_paris(engine, card) -> None:
    ids = chat_ids(card, "What is the capital of France?")
    outs = run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 30}))
    text = card.tokenizer.decode(tokens(outs), skip_special_tokens=True)
    assert "Paris" in text, text
    assert outs[-1].finish_reason == FINISH_STOP  # the model's end-of-turn token
    assert outs[0].cached_tokens is not None
    assert all(o.finish_reason is None for o in outs[:-1])


def test_prefix_is_reused(engine, card) -> None:
    ids = chat_ids(card, "Write a long story about a cat. " * 20)
    run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 2}))
    again = run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 2}))
    assert again[0].cached_tokens >= engine.vllm_block_size


def test_max_tokens_seed_and_length(engine, card) -> None:
    ids = chat_ids(card, "Tell me a story.")
    opts = {"temperature": 1.0, "seed": 7}
    a = run(engine, request(ids, sampling=opts, stop={"max_tokens": 12, "ignore_eos": True}))
    b = run(engine, request(ids, sampling=opts, stop={"max_tokens": 12, "ignore_eos": True}))
    c = run(engine, request(ids, sampling={**opts, "seed": 8}, stop={"max_tokens": 12}))
    assert tokens(a) == tokens(b)
    assert len(tokens(a)) == 12 and a[-1].finish_reason == FINISH_LENGTH
    assert tokens(c) != tokens(a)


def test_ignore_eos_runs_past_the_end_of_turn(engine, card) -> None:
    """The greedy answer ends with the end-of-turn token; with ignore_eos the same request
    (end-of-turn ids among its stop tokens, as the frontend sends them) runs to max_tokens."""
    ids = chat_ids(card, "What is the capital of France?")
    stop = {"max_tokens": 60, "stop_token_ids": card.stop_token_ids}
    ended = run(engine, request(ids, sampling={"temperature": 0}, stop=stop))
    assert ended[-1].finish_reason == FINISH_STOP and len(tokens(ended)) < 60
    stop["ignore_eos"] = True
    outs = run(engine, request(ids, sampling={"temperature": 0}, stop=stop))
    assert len(tokens(outs)) == 60 and outs[-1].finish_reason == FINISH_LENGTH


def test_stop_token_ids_and_min_tokens(engine, card) -> None:
    ids = chat_ids(card, "Count from one to twenty.")
    greedy = tokens(run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 10})))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    outs = run(
        engine,
        request(
            ids,
            sampling={"temperature": 0},
            stop={"max_tokens": 10, "stop_token_ids": [stop_at]},
        ),
    )
    assert outs[-1].finish_reason == FINISH_STOP
    assert tokens(outs)[:first] == greedy[:first]
    assert len(tokens(outs)) <= first + 1
    # min_tokens: the end-of-turn token cannot end the answer before 20 tokens.
    eos = card.eos_token_ids[0]
    long = run(
        engine,
        request(
            ids,
            sampling={"temperature": 0},
            stop={"max_tokens": 20, "min_tokens": 20, "stop_token_ids": [eos]},
        ),
    )
    assert len(tokens(long)) == 20


def test_penalties_change_the_answer(engine, card) -> None:
    ids = chat_ids(card, "Repeat the word cat many times.")
    plain = run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 24}))
    penal = run(
        engine,
        request(
            ids,
            sampling={"temperature": 0, "frequency_penalty": 2.0, "presence_penalty": 1.5},
            stop={"max_tokens": 24},
        ),
    )
    assert tokens(plain) != tokens(penal)


def test_logprobs(engine, card) -> None:
    ids = chat_ids(card, "Say hello.")
    outs = run(
        engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 5}, logprobs=3)
    )
    items = [lp for o in outs for lp in o.logprobs]
    assert len(items) == len(tokens(outs)) == 5
    for item, token in zip(items, tokens(outs), strict=True):
        assert item.token_id == token
        assert len(item.top) == 3
        values = [lp for _, lp in item.top]
        assert values == sorted(values, reverse=True)
        assert item.logprob <= 0
        assert item.top[0][1] == pytest.approx(item.logprob, abs=1e-4)  # greedy: the best


def test_json_schema_and_json_object(engine, card) -> None:
    can = engine.capabilities()
    assert can.json_schema and can.json_object
    ids = chat_ids(card, "Which city is the capital of France? Answer in JSON.")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    outs = run(
        engine,
        request(ids, sampling={"temperature": 0, "json_schema": schema}, stop={"max_tokens": 60}),
    )
    value = json.loads(card.tokenizer.decode(tokens(outs), skip_special_tokens=True))
    assert set(value) == {"city"} and isinstance(value["city"], str)
    outs = run(
        engine,
        request(ids, sampling={"temperature": 0, "json_object": True}, stop={"max_tokens": 60}),
    )
    text = card.tokenizer.decode(tokens(outs), skip_special_tokens=True)
    assert isinstance(json.loads(text), dict), text


def test_cancel_frees_the_request_in_vllm(engine, card) -> None:
    ids = chat_ids(card, "Tell me a very long story.")

    async def start_and_cancel():
        gen = engine.generate(
            request(ids, stop={"max_tokens": 1500, "ignore_eos": True}, request_id="cancel-me")
        )
        got = 0
        async for out in gen:
            got += len(out.token_ids)
            if got >= 4:
                break
        during = (engine.in_flight, engine.load())
        await gen.aclose()
        return during

    in_flight, load = engine.test_loop.run(start_and_cancel())
    assert in_flight == 1
    assert load.slots_busy == 1 and load.kv_blocks_used >= 1
    assert load.slots_total == engine.max_num_seqs and load.kv_blocks_total == engine.num_kv_blocks
    assert engine.in_flight == 0  # vLLM no longer tracks it: aborted, not left running
    deadline = time.monotonic() + 5
    while engine.snapshot.running and time.monotonic() < deadline:
        time.sleep(0.05)
    # The next request is served at once (the cancelled one is not generating 1500 tokens).
    start = time.monotonic()
    run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 2}))
    assert time.monotonic() - start < 20


def test_kv_events_are_our_chained_hashes(engine, card) -> None:
    """vLLM's BlockStored events for a prompt, re-hashed: our block hashes of its tokens, in
    blocks of our size (16), chained from the first block; a prefix-cache reset clears."""
    events: list[KvCacheEvent] = []
    engine.set_kv_event_sink(events.append)
    try:
        ids = chat_ids(card, "Explain photosynthesis in detail, step by step. " * 40)
        assert len(ids) > 2 * engine.vllm_block_size
        run(engine, request(ids, sampling={"temperature": 0}, stop={"max_tokens": 2}))
        full = len(ids) // engine.vllm_block_size * engine.vllm_block_size
        expected = block_hashes(ids[:full], engine.kv_block_size)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stored = [h for e in events if e.kind == KV_STORED for h in e.block_hashes]
            if set(expected) <= set(stored):
                break
            time.sleep(0.05)
        assert set(expected) <= set(stored)
        parent: dict[int, int | None] = {}
        for e in events:
            if e.kind == KV_STORED:
                for i, h in enumerate(e.block_hashes):
                    parent[h] = e.block_hashes[i - 1] if i else e.parent_hash
        assert parent[expected[0]] is None
        assert [parent[h] for h in expected[1:]] == expected[:-1]
        assert all(e.block_size == engine.kv_block_size for e in events)
        assert engine.test_loop.run(engine.llm.reset_prefix_cache())
        # vLLM publishes the events its cache queued at its next step.
        run(engine, request(ids[:8], sampling={"temperature": 0}, stop={"max_tokens": 1}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e.kind in (KV_CLEARED, KV_REMOVED) for e in events
        ):
            time.sleep(0.05)
        assert any(e.kind in (KV_CLEARED, KV_REMOVED) for e in events)
        assert not engine.kv.held
    finally:
        engine.set_kv_event_sink(None)


def test_gguf_is_one_clear_line(default_card) -> None:
    from dynamo_run_vllm import create_engine

    with pytest.raises(EngineError) as err:
        create_engine(default_card, EngineConfig())
    assert "GGUF" in str(err.value) and "out=llamacpp" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_engine_argument_names_the_close_one(card) -> None:
    from dynamo_run_vllm.args import build_engine_args

    with pytest.raises(EngineError, match="did you mean 'max_num_seqs'"):
        build_engine_args(card, EngineConfig(extra={"max_num_seq": 4}), "ipc://a", "ipc://b", True)
    args = build_engine_args(
        card,
        EngineConfig(
            context_length=512,
            kv_cache_block_size=32,
            tensor_parallel_size=1,
            extra={
                "max_num_seqs": 4,
                "kv_events_config": {"enable_kv_cache_events": True, "endpoint": "ipc://x"},
            },
        ),
        "ipc://a",
        "ipc://b",
        True,
    )
    assert (args.max_model_len, args.block_size, args.tensor_parallel_size) == (512, 32, 1)
    assert args.max_num_seqs == 4 and args.kv_events_config.endpoint == "ipc://x"
    assert args.enforce_eager is True and args.model == str(card.path)
