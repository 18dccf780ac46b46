"""Benchmark the llamacpp engine without HTTP.

``engine`` (default): single-stream and concurrent greedy decoding through the engine, and
the Python time each scheduler step spends outside llama_decode.

``decode``: the bare cost of one ``llama_decode`` step holding one token of each of B
sequences, for context settings given as JSON (n_threads, n_ctx, kv_unified, flash_attn,
n_ubatch, and "shuffled": the sequences out of id order in the batch): what a scheduler
step can cost at best, before any Python.

    .venv/bin/python scripts/bench_engine_step.py [engine] [--tokens 64] [--concurrency 4]
        [--extra '{"n_threads": 2}'] [--model PATH]
    .venv/bin/python scripts/bench_engine_step.py decode [--batch 1,4]
        [--config '{"n_threads": 2, "kv_unified": true}' ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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


async def engine_main(args: argparse.Namespace) -> None:
    card = load_model_card(args.model)
    extra = {"n_parallel": max(4, args.concurrency), **json.loads(args.extra)}
    engine = create_engine(card, EngineConfig(extra=extra))
    print(json.dumps({"settings": engine.settings.__dict__}))
    try:
        await _phase(engine, card, 1, 8, 100)  # warm-up
        for phase_conc in (1, args.concurrency):
            for r in range(args.repeat):
                row = await _phase(engine, card, phase_conc, args.tokens, 10 * r)
                print(json.dumps(row))
    finally:
        await engine.close()


# --- bare llama_decode -----------------------------------------------------------------


def decode_main(args: argparse.Namespace) -> None:
    """Median step time over ``--steps`` decode steps after a ``--prompt``-token prefill of
    each sequence; configurations run round-robin ``--rounds`` times, best round kept."""
    import llama_cpp.llama_cpp as L
    import numpy as np
    from dynamo_run_llamacpp.config import LlamaCppSettings
    from dynamo_run_llamacpp.native import Batch, init_backend, load_model

    card = load_model_card(args.model)
    init_backend(False)
    model = load_model(card.path, LlamaCppSettings())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    configs = [json.loads(c) for c in args.config] or [{}]
    sizes = [int(b) for b in args.batch.split(",")]
    best: dict[tuple[int, int], float] = {}

    def one(cfg: dict, b: int) -> float:
        p = L.llama_context_default_params()
        p.n_seq_max = cfg.get("n_seq", max(sizes))
        p.n_ctx = cfg.get("n_ctx", 4096 * p.n_seq_max)
        p.n_batch = cfg.get("n_batch", 512)
        p.n_ubatch = cfg.get("n_ubatch", 512)
        p.n_threads = p.n_threads_batch = cfg.get("n_threads", 2)
        p.kv_unified = cfg.get("kv_unified", False)
        p.flash_attn_type = {None: -1, True: 1, False: 0}[cfg.get("flash_attn")]
        p.no_perf = True
        ctx = L.llama_init_from_model(model, p)
        try:
            batch = Batch(max(p.n_batch, b), p.n_seq_max)
            prompt = args.prompt
            for s in range(b):  # prefill each sequence, n_batch tokens at a time
                ids = (np.arange(prompt) * 7 + 13 * s) % 1000 + 100
                for start in range(0, prompt, p.n_batch):
                    k = min(p.n_batch, prompt - start)
                    batch.tokens[:k] = ids[start : start + k]
                    batch.pos[:k] = np.arange(start, start + k)
                    batch.seq[:k] = batch.seq_addr[s]
                    batch.logits[:k] = 0
                    batch.logits[k - 1] = 1
                    assert batch.decode(ctx, k) == 0
            # The sequences' order in the batch: by id, or a fixed shuffle of the ids.
            order = np.arange(b)
            if cfg.get("shuffled"):
                order = np.random.default_rng(1).permutation(b)
                if b > 1 and (order == np.arange(b)).all():
                    order = np.roll(order, 1)
            times = []
            for step in range(args.steps):
                batch.tokens[:b] = 200 + step
                batch.pos[:b] = prompt + step
                batch.seq[:b] = batch.seq_addr[order]
                batch.logits[:b] = 1
                t = time.perf_counter()
                assert batch.decode(ctx, b) == 0
                rows = np.ctypeslib.as_array(L.llama_get_logits(ctx), (b, n_vocab))
                rows.argmax(axis=1)
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        finally:
            L.llama_free(ctx)

    try:
        for _ in range(args.rounds):
            for i, cfg in enumerate(configs):
                for b in sizes:
                    ms = 1000 * one(cfg, b)
                    best[i, b] = min(best.get((i, b), ms), ms)
        for i, cfg in enumerate(configs):
            for b in sizes:
                ms = best[i, b]
                print(
                    json.dumps(
                        {
                            **cfg,
                            "B": b,
                            "step_ms": round(ms, 2),
                            "tokens_per_s": round(1000 * b / ms, 1),
                        }
                    )
                )
    finally:
        L.llama_model_free(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", nargs="?", choices=("engine", "decode"), default="engine")
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--extra", default="{}", help="engine args as JSON")
    parser.add_argument("--batch", default="1,4", help="decode: sequences per step")
    parser.add_argument("--config", action="append", default=[], help="decode: settings JSON")
    parser.add_argument("--prompt", type=int, default=64, help="decode: prompt tokens each")
    parser.add_argument("--steps", type=int, default=48, help="decode: steps timed")
    parser.add_argument("--rounds", type=int, default=2, help="decode: round-robin repeats")
    args = parser.parse_args()
    if args.mode == "decode":
        decode_main(args)
    else:
        asyncio.run(engine_main(args))


if __name__ == "__main__":
    main()
