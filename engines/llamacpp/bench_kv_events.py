"""What reporting KV events costs the llamacpp engine's scheduler.

``micro``: the scheduler's KV bookkeeping alone, per generated token of one sequence (a
block hash every ``block_size`` tokens and its ``stored`` event), and per prompt token of a
prefill, with a sink like the worker's (a hand-off to an event loop on another thread).

``engine`` (default): the engine with the default model, decoding ``--concurrency`` streams
of ``--tokens`` tokens; rounds alternate without a sink and with one, on the same engine,
so each pair of rounds sees the same machine load. Per round: the scheduler's time per step
outside ``llama_decode`` (``overhead``), the whole loop turn (``loop``), and (``kv``) the
time spent in the KV bookkeeping itself (KvTracker's methods, hashing and the sink calls
included, timed from the outside), in ms.

    .venv/bin/python engines/llamacpp/bench_kv_events.py [engine] [--rounds 6]
        [--concurrency 4] [--tokens 64] [--extra '{"n_threads": 1}']
    .venv/bin/python engines/llamacpp/bench_kv_events.py micro
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import numpy as np
from dynamo_run_llamacpp.kv_events import KvTracker

from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE
from dynamo_run.protocol.internal import KvCacheEvent, PreprocessedRequest, SamplingOptions
from dynamo_run.protocol.internal import StopConditions as Stop


def _loop_sink() -> tuple[object, list[KvCacheEvent], asyncio.AbstractEventLoop]:
    """A sink handing events to an event loop running on its own thread, as the worker's
    KvEventPublisher does; the events it received; the loop."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    received: list[KvCacheEvent] = []

    def sink(event: KvCacheEvent) -> None:
        loop.call_soon_threadsafe(received.append, event)

    return sink, received, loop


def micro_main(args: argparse.Namespace) -> None:
    bs = args.block_size
    sink, received, loop = _loop_sink()
    rng = np.random.default_rng(0)
    n = 4096
    tokens = rng.integers(0, 49152, n, dtype=np.int32)
    rows = {}

    def decode_path(kv: KvTracker | None) -> float:
        """The per-token work of _step's decode loop, for one sequence over n tokens."""
        slot_tokens = np.zeros(n, dtype=np.int32)
        hashes: list[int] = []
        start = time.perf_counter()
        for i in range(n):
            slot_tokens[i] = tokens[i]
            m = i + 1
            if kv is not None and m % kv.block_size == 0:
                kv.extend(hashes, slot_tokens[:m])
        return (time.perf_counter() - start) / n

    def prefill_path(kv: KvTracker, chunk: int) -> float:
        """Hashing a prompt as _step's chunks complete it, per prompt token."""
        hashes: list[int] = []
        start = time.perf_counter()
        for end in range(chunk, n + 1, chunk):
            kv.extend(hashes, tokens[:end])
        return (time.perf_counter() - start) / n

    for _ in range(args.rounds):
        for name, fn in (
            ("decode, no sink", lambda: decode_path(None)),
            ("decode, sink", lambda: decode_path(KvTracker(bs, sink))),
            ("prefill 512-token chunks, sink", lambda: prefill_path(KvTracker(bs, sink), 512)),
        ):
            rows.setdefault(name, []).append(fn())
    for name, times in rows.items():
        print(json.dumps({"path": name, "us_per_token": round(1e6 * min(times), 3)}))
    loop.call_soon_threadsafe(loop.stop)
    print(json.dumps({"events_received": len(received)}))


def _request(card, i: int, n_tokens: int) -> PreprocessedRequest:
    question = f"Question {i}: tell me about the number {i} and its neighbours."
    prompt = card.chat_template.render([{"role": "user", "content": question}])
    ids = card.tokenizer.encode(prompt, add_special_tokens=False).ids
    return PreprocessedRequest(
        request_id=f"bench-{i}",
        token_ids=ids,
        sampling=SamplingOptions(temperature=0.0),
        stop=Stop(max_tokens=n_tokens, ignore_eos=True),
    )


# Seconds inside KvTracker's entry points while serving, call depth, seconds of the
# one-off catch-up when a sink is set (Scheduler.set_kv_sink hashing all that is held).
_KV_TIME = [0.0, 0, 0.0]


def _timed(method, bucket: int):
    def wrapper(*args, **kwargs):
        _KV_TIME[1] += 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            _KV_TIME[1] -= 1
            if _KV_TIME[1] == 0:  # the outermost call: hold inside extend counts once
                _KV_TIME[bucket] += time.perf_counter() - start

    return wrapper


def _instrument() -> None:
    from dynamo_run_llamacpp.scheduler import Scheduler

    for name in ("chain", "extend", "truncate", "replace", "hold", "release", "clear"):
        setattr(KvTracker, name, _timed(getattr(KvTracker, name), 0))
    Scheduler.set_kv_sink = _timed(Scheduler.set_kv_sink, 2)


async def _round(engine, card, conc: int, n_tokens: int, base: int) -> dict:
    before = engine.stats()
    kv_before = _KV_TIME[0]

    async def one(i: int) -> None:
        async for _ in engine.generate(_request(card, base + i, n_tokens)):
            pass

    await asyncio.gather(*(one(i) for i in range(conc)))
    after = engine.stats()
    steps = max(1, after["steps"] - before["steps"])

    def per_step(key: str) -> float:
        return 1000 * (after[key] - before[key]) / steps

    return {
        "steps": steps,
        "overhead_ms": round(per_step("step_s") - per_step("decode_s"), 4),
        "loop_ms": round(per_step("loop_s"), 3),
        "decode_ms": round(per_step("decode_s"), 3),
        "kv_ms": round(1000 * (_KV_TIME[0] - kv_before) / steps, 4),
    }


async def engine_main(args: argparse.Namespace) -> None:
    from dynamo_run_llamacpp import create_engine

    from dynamo_run.engine import EngineConfig
    from dynamo_run.model.card import load_model_card

    _instrument()
    card = load_model_card(args.model)
    extra = {"n_parallel": args.concurrency, **json.loads(args.extra)}
    engine = create_engine(card, EngineConfig(kv_cache_block_size=args.block_size, extra=extra))
    loop = asyncio.get_running_loop()
    events: list[KvCacheEvent] = []

    def sink(event: KvCacheEvent) -> None:  # as the worker's publisher: onto this loop
        loop.call_soon_threadsafe(events.append, event)

    results: dict[str, list[dict]] = {"none": [], "sink": []}
    try:
        await _round(engine, card, args.concurrency, 8, 10_000)  # warm-up
        for r in range(args.rounds):
            for mode in ("none", "sink") if r % 2 == 0 else ("sink", "none"):
                engine.set_kv_event_sink(sink if mode == "sink" else None)
                # Distinct prompts every round: each round prefills (and hashes) anew.
                row = await _round(engine, card, args.concurrency, args.tokens, 100 * (r + 1))
                row["mode"] = mode
                print(json.dumps(row), flush=True)
                results[mode].append(row)
        diffs = [
            s["overhead_ms"] - n["overhead_ms"]
            for n, s in zip(results["none"], results["sink"], strict=True)
        ]
        summary = {
            mode: {
                key: round(statistics.median(row[key] for row in rows), 4)
                for key in ("overhead_ms", "loop_ms", "decode_ms", "kv_ms")
            }
            for mode, rows in results.items()
        }
        summary["paired_overhead_diff_ms"] = {
            "median": round(statistics.median(diffs), 4),
            "min": round(min(diffs), 4),
            "max": round(max(diffs), 4),
        }
        summary["events"] = len(events)
        summary["sink_set_catch_up_ms_total"] = round(1000 * _KV_TIME[2], 3)
        print(json.dumps(summary))
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", nargs="?", choices=("engine", "micro"), default="engine")
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--extra", default="{}", help="engine args as JSON")
    args = parser.parse_args()
    if args.mode == "micro":
        micro_main(args)
    else:
        asyncio.run(engine_main(args))


if __name__ == "__main__":
    main()
