"""Benchmark grammar-constrained decoding on the llamacpp engine (no HTTP): decode tokens/s
and time to first token with no grammar, the json_object grammar, and grammars converted
from JSON schemas (a response format, a forced tool call), at concurrency 1 and 4.

Each request asks for a long JSON answer (greedy) so the constrained runs generate about as
many tokens as the unconstrained ones (``--tokens``, ``ignore_eos`` for the unconstrained).

    .venv/bin/python scripts/bench_grammar.py [--tokens 96] [--repeat 3]
        [--concurrency 1,4] [--extra '{"n_threads": 2}'] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from bench_servers import emit_report
from dynamo_run_llamacpp import create_engine
from dynamo_run_llamacpp.engine import LlamaCppEngine
from dynamo_run_llamacpp.grammar import schema_grammar

from dynamo_run.engine import EngineConfig
from dynamo_run.model.card import ModelCard, load_model_card
from dynamo_run.pipeline.chat_plan import call_schema
from dynamo_run.protocol.internal import PreprocessedRequest, SamplingOptions, StopConditions

PROMPT = "List ten famous people as JSON, with name, country, born year and a short biography."
PEOPLE = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "country": {"type": "string"},
                    "born": {"type": "integer"},
                    "bio": {"type": "string"},
                },
                "required": ["name", "country", "born", "bio"],
            },
        }
    },
    "required": ["people"],
}
TOOL = {
    "name": "save_people",
    "parameters": {
        "type": "object",
        "properties": {"names": {"type": "array", "items": {"type": "string"}}},
        "required": ["names"],
    },
}
MODES: dict[str, SamplingOptions] = {
    "none": SamplingOptions(temperature=0.0),
    "json_object": SamplingOptions(temperature=0.0, json_object=True),
    "json_schema": SamplingOptions(temperature=0.0, json_schema=PEOPLE),
    # The same without the fast path: the grammar runs over the vocabulary each step.
    "json_schema, full pass": SamplingOptions(temperature=0.0, json_schema=PEOPLE),
    "tool_call": SamplingOptions(temperature=0.0, json_schema=call_schema(TOOL)),
    "json_schema, temperature 0.8": SamplingOptions(temperature=0.8, seed=1, json_schema=PEOPLE),
    "none, temperature 0.8": SamplingOptions(temperature=0.8, seed=1),
}


def _request(card: ModelCard, mode: str, i: int, n_tokens: int) -> PreprocessedRequest:
    prompt = card.chat_template.render([{"role": "user", "content": f"{PROMPT} ({i})"}])
    ids = card.tokenizer.encode(prompt, add_special_tokens=False).ids
    return PreprocessedRequest(
        request_id=f"bench-{mode}-{i}",
        token_ids=ids,
        sampling=MODES[mode],
        stop=StopConditions(
            max_tokens=n_tokens,
            stop_token_ids=card.stop_token_ids,
            ignore_eos=mode.startswith("none"),
        ),
    )


async def _one(engine: LlamaCppEngine, req: PreprocessedRequest) -> tuple[int, float, float]:
    """Tokens, seconds to the first token, seconds from the first token to the last."""
    n, start, first = 0, time.perf_counter(), 0.0
    async for out in engine.generate(req):
        if n == 0 and out.token_ids:
            first = time.perf_counter()
        n += len(out.token_ids)
    return n, first - start, time.perf_counter() - first


async def _round(
    engine: LlamaCppEngine, card: ModelCard, mode: str, conc: int, n: int, base: int
) -> dict[str, float]:
    results = await asyncio.gather(
        *(_one(engine, _request(card, mode, base + i, n)) for i in range(conc))
    )
    tokens = sum(r[0] for r in results)
    decode = max(r[2] for r in results)
    return {
        "tokens": tokens / conc,
        "ttft_ms": 1000 * statistics.median(r[1] for r in results),
        "tps": (tokens - conc) / decode if decode > 0 else 0.0,
    }


async def bench(args: argparse.Namespace) -> str:
    card = load_model_card(args.model)
    extra = json.loads(args.extra)
    levels = [int(c) for c in args.concurrency.split(",")]
    extra.setdefault("n_parallel", max(levels))
    engine = create_engine(card, EngineConfig(context_length=card.context_length, extra=extra))
    start = time.perf_counter()
    for schema in (PEOPLE, call_schema(TOOL)):
        schema_grammar(schema)
    convert_ms = 1000 * (time.perf_counter() - start)
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        await _round(engine, card, "none", 1, 8, 10_000)  # warm-up
        base = 0
        for _ in range(args.repeat):  # modes interleaved so that load drifts hit all alike
            for conc in levels:
                for mode in MODES:
                    picker = engine.scheduler._picker
                    if mode.endswith("full pass"):  # the grammar refuses every first choice
                        picker.allows = lambda grammar, token: False  # type: ignore[method-assign]
                    try:
                        row = await _round(engine, card, mode, conc, args.tokens, base)
                    finally:
                        picker.__dict__.pop("allows", None)
                    rows.setdefault((mode, conc), []).append(row)
                    base += conc
    finally:
        await engine.close()
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load = os.getloadavg()[0]
    lines = [
        f"### bench_grammar {stamp} UTC (load average {load:.1f}, `--tokens {args.tokens} "
        f"--repeat {args.repeat}`, threads {engine.settings.n_threads}, greedy unless noted)",
        "",
        "| grammar | concurrency | tokens/answer | TTFT p50 ms | decode tokens/s | vs no grammar |",
        "|---|---|---|---|---|---|",
    ]
    for conc in levels:
        for mode in MODES:
            got = rows[(mode, conc)]
            tps = statistics.median(r["tps"] for r in got)
            baseline = "none, temperature 0.8" if "temperature" in mode else "none"
            base_tps = statistics.median(r["tps"] for r in rows[(baseline, conc)])
            lines.append(
                f"| {mode} | {conc} | {statistics.mean(r['tokens'] for r in got):.0f} | "
                f"{statistics.median(r['ttft_ms'] for r in got):.0f} | {tps:.1f} | "
                f"{tps / base_tps:.2f}x |"
            )
    lines += ["", f"Schema -> GBNF conversion, both schemas, first time: {convert_ms:.1f} ms.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--extra", default="{}", help="engine args as JSON")
    parser.add_argument("--out", type=Path, default=None, help="append the report here")
    args = parser.parse_args()
    emit_report(asyncio.run(bench(args)), args.out)


if __name__ == "__main__":
    main()
