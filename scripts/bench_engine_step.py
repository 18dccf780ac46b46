"""Benchmark the llamacpp engine: single-stream and concurrent greedy decoding, and the
Python time each scheduler step spends outside llama_decode.

    .venv/bin/python scripts/bench_engine_step.py [--tokens 64] [--concurrency 4]
        [--extra '{"n_threads": 2}'] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from dynamo_run_llamacpp import create_engine
from dynamo_run_llamacpp.engine import LlamaCppEngine

from dynamo_run.engine import EngineConfig
from dynamo_run.model.card import ModelCard, load_model_card
from dynamo_run.protocol.internal import PreprocessedRequest, SamplingOptions, StopConditions

QUESTIONS = [
    "Tell me about the history of Rome.",
    "Explain how a bicycle works.",
    "Write a poem about autumn leaves.",
    "Describe the water cycle in detail.",
    "What makes a good cup of coffee?",
    "Summarise the plot of Hamlet.",
    "How do airplanes stay in the air?",
    "Give advice for learning to cook.",
]


def _request(card: ModelCard, i: int, n_tokens: int) -> PreprocessedRequest:
    prompt = card.chat_template.render([{"role": "user", "content": QUESTIONS[i % 8]}])
    ids = card.tokenizer.encode(prompt, add_special_tokens=False).ids
    return PreprocessedRequest(
        request_id=f"bench-{i}",
        token_ids=ids,
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=n_tokens, ignore_eos=True),
    )


async def _one(engine: LlamaCppEngine, req: PreprocessedRequest) -> tuple[int, float]:
    """Tokens generated, and seconds from the first token to the last (decode only)."""
    n, first = 0, 0.0
    async for out in engine.generate(req):
        if n == 0:
            first = time.perf_counter()
        n += len(out.token_ids)
    return n, time.perf_counter() - first


async def _phase(engine: LlamaCppEngine, card: ModelCard, conc: int, n_tokens: int, base: int):
    before = engine.stats()
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_one(engine, _request(card, base + i, n_tokens)) for i in range(conc))
    )
    wall = time.perf_counter() - start
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    overhead = (after["step_s"] - after["decode_s"]) - (before["step_s"] - before["decode_s"])
    decode = after["decode_s"] - before["decode_s"]
    total = sum(n for n, _ in results)
    decode_wall = max(t for _, t in results)
    return {
        "concurrency": conc,
        "tokens": total,
        "wall_s": round(wall, 3),
        "tokens_per_s_incl_prefill": round(total / wall, 1),
        "decode_tokens_per_s": round((total - conc) / decode_wall, 1) if decode_wall else None,
        "steps": steps,
        "decode_ms_per_step": round(1000 * decode / max(1, steps), 3),
        "python_overhead_ms_per_step": round(1000 * overhead / max(1, steps), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--extra", default="{}", help="engine args as JSON")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    card = load_model_card(args.model)
    extra = {"n_parallel": max(4, args.concurrency), **json.loads(args.extra)}
    engine = create_engine(card, EngineConfig(extra=extra))
    try:
        await _phase(engine, card, 1, 8, 100)  # warm-up
        for phase_conc in (1, args.concurrency):
            for r in range(args.repeat):
                row = await _phase(engine, card, phase_conc, args.tokens, 10 * r)
                print(json.dumps(row))
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
