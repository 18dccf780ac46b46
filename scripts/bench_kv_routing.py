#!/usr/bin/env python
"""KV-aware routing benchmark (issue 11): ``--router-mode kv`` against round-robin and random
on a shared-prefix workload, through one ``in=http out=dyn`` frontend per mode.

Every part runs against one nats-server that this script starts on a free loopback port
(passed to every process with ``--nats-url``); every process is stopped at the end, also on
failure. Each phase (one mode, one round) starts its own workers and frontend in a fresh
namespace, so every mode starts with cold caches and an empty index; modes are interleaved
over ``--rounds`` (the order rotating each round) and the report gives medians.

  mocker    ``--workers`` ``out=mocker`` workers whose prefill costs ``--prefill-ms`` per
            uncached token (a 2k-token prompt: ~200 ms). ``--prefixes`` shared documents of
            ``--prefix-tokens`` tokens each; every request is one of them (chosen at random)
            plus a unique question of ``--question-tokens`` tokens, ``--max-tokens`` tokens
            out. Open loop: Poisson arrivals at ``--load`` x the capacity the mocker's cost
            model gives for prompts that hit no cache (see ``capacity``), for ``--duration``
            seconds; the same arrival times, documents and questions (``--seed``) in every
            mode.
  llamacpp  two ``out=llamacpp`` workers on the default model (``--llama-parallel`` slots,
            one thread each, prompt cache ``--llama-prompt-cache-mib``), the same kind of
            workload scaled down: ``--llama-prefixes`` documents of ``--llama-prefix-tokens``,
            ``--llama-requests`` requests sent by ``--llama-clients`` closed-loop clients.

Per mode: TTFT p50/p99 (client side: request sent to its first non-empty text chunk), output
tokens/s (completion tokens over the time from the first request sent to the last answer
done), the cache hit rate (sum of ``usage.prompt_tokens_details.cached_tokens`` over the sum
of ``prompt_tokens``, and the frontend's ``dynamo_frontend_worker_reported_cached_tokens_total``
over the same prompt tokens), and how the requests spread over the workers.

Modes: ``kv`` (the workers' KV events), ``kv-predicted`` (``--no-kv-events``: the router's
own TTL-predicted index), ``kv-wN`` (``kv`` with ``--kv-overlap-score-weight N``),
``round-robin``, ``random``.

    .venv/bin/python scripts/bench_kv_routing.py [--parts mocker,llamacpp] [--rounds 2]
        [--modes kv,round-robin,random] [--llama-modes kv,kv-predicted,round-robin]
        [--llama-rounds 1] [--tree DIR] [--out FILE.md] [more knobs: --help]

The defaults take ~8 minutes on 2 busy cores (mocker ~4, llamacpp ~4); docs/benchmarks.md
gives the commands and figures of issue 11 (each part run on its own, with kv-w4 added).

``--tree DIR``: every dynamo-run process runs DIR's ``dynamo_run`` (and DIR's
``engines/llamacpp`` when it has one), e.g. ``git archive HEAD dynamo_run engines | tar -x -C
DIR``, so that uncommitted work of others in this checkout stays out of the figures.

Process helpers (the nats-server, ready checks, CPU of a process) come from
bench_distributed.py and bench_servers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_distributed import Cluster, wait_instances, wait_quiet
from bench_llamacpp import machine_busy_seconds, pct
from bench_servers import PY, ROOT, Target, emit_report

CORES = len(os.sched_getaffinity(0))
MODEL = "SmolLM2-135M-Instruct"
BLOCK = 16  # the mocker's and the router's default block size (tokens)

# Plain words for documents and questions: ~1.2 tokens each with the default tokenizer.
_WORD_TEXT = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "which but all can had one were their there been has more will would when what about "
    "into other some time only could new these two may first then any like such after "
    "over also most made between many before must through where much even because each "
    "those people state under world water work part long little house system program "
    "number group market report power city school company service account record river "
    "mountain garden window engine signal harbor valley forest bridge station council "
    "budget contract license policy network storage process memory channel surface "
    "pressure voltage current battery motor sensor cable switch filter valve pump "
    "copper silver iron carbon oxygen glass paper cotton wool timber marble granite "
    "north south east west summer winter spring autumn morning evening yellow purple "
    "orange violet simple careful quiet rapid gentle formal steady narrow broad"
)
WORDS = _WORD_TEXT.split()


# --- the workload ---------------------------------------------------------------------------


def load_tokenizer(tree: Path):  # type: ignore[no-untyped-def]
    """The default model's tokenizer, as the frontend builds it from the GGUF."""
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    from dynamo_run.model.gguf_meta import read_gguf_metadata
    from dynamo_run.model.gguf_tokenizer import tokenizer_from_gguf
    from dynamo_run.model.resolve import default_model_path

    return tokenizer_from_gguf(read_gguf_metadata(default_model_path()))


def words_of_tokens(rng: random.Random, tokenizer, n_tokens: int) -> str:  # type: ignore[no-untyped-def]
    """Random plain words, cut after about ``n_tokens`` tokens."""
    text = " ".join(rng.choice(WORDS) for _ in range(n_tokens))  # > n_tokens tokens
    enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc.ids) <= n_tokens:
        return text
    return text[: enc.offsets[n_tokens][0]].rstrip()


@dataclass
class Workload:
    prefixes: list[str]
    prompts: list[str]  # one per request
    prefix_of: list[int]  # which document each request uses
    arrivals: list[float]  # seconds from the start (open loop), empty for closed loop
    prompt_tokens: float  # mean, by the tokenizer
    prefix_tokens: float  # mean tokens of a document alone

    def first_uses(self) -> int:
        return len(set(self.prefix_of))


def make_workload(
    tokenizer,  # type: ignore[no-untyped-def]
    seed: int,
    n_prefixes: int,
    prefix_tokens: int,
    question_tokens: int,
    n_requests: int,
    rate: float | None,
) -> Workload:
    """Documents, then requests (a document at random + a unique question), all drawn from
    one seeded generator: the same seed gives the same workload."""
    rng = random.Random(seed)
    prefixes = [
        f"Document {k}. " + words_of_tokens(rng, tokenizer, prefix_tokens - 4)
        for k in range(n_prefixes)
    ]
    prompts, prefix_of, arrivals = [], [], []
    t = 0.0
    for i in range(n_requests):
        k = rng.randrange(n_prefixes)
        question = words_of_tokens(rng, tokenizer, question_tokens - 6)
        prompts.append(f"{prefixes[k]}\n\nQuestion {i}: {question}?\nAnswer:")
        prefix_of.append(k)
        if rate is not None:
            t += rng.expovariate(rate)
            arrivals.append(t)
    sample = prompts[: min(len(prompts), 64)]
    mean = statistics.mean(len(tokenizer.encode(p).ids) for p in sample)
    doc = statistics.mean(len(tokenizer.encode(p).ids) for p in prefixes)
    return Workload(prefixes, prompts, prefix_of, arrivals, mean, doc)


def capacity(args: argparse.Namespace, prompt_tokens: float) -> float:
    """Requests/s the mocker workers sustain when no prompt hits a cache.

    A worker steps all its sequences together; a step lasts (base + per_seq x batch +
    prefill_ms x new prompt tokens) / speedup. At λ requests/s per worker, each request
    adding P prompt tokens and D decode steps, the mean step time t satisfies
    t = base + per_seq x λ D t + prefill_ms x λ P t (batch = λ D t by Little's law), so
    t = base / (1 - λ (P prefill_ms + D per_seq)): finite only while λ < 1 / (P prefill_ms +
    D per_seq). That bound, times the speedup, is one worker's capacity."""
    per_request_ms = prompt_tokens * args.prefill_ms + args.max_tokens * args.decode_ms_per_seq
    return args.workers * args.speedup * 1000.0 / per_request_ms


# --- one streamed request ---------------------------------------------------------------------


@dataclass
class Result:
    index: int
    start: float = math.nan
    ttft: float = math.nan
    end: float = math.nan
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, result: Result) -> Result:
    """POST a streamed completion; TTFT = first chunk whose text is not empty."""
    result.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as res:
            if res.status_code != 200:
                result.error = f"HTTP {res.status_code}: {(await res.aread())[:200]!r}"
                return result
            async for line in res.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                choices = event.get("choices") or []
                if choices and choices[0].get("text") and math.isnan(result.ttft):
                    result.ttft = time.perf_counter() - result.start
                if "error" in event:
                    result.error = str(event["error"])[:200]
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
    except (httpx.HTTPError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


def request_body(prompt: str, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def open_loop(
    port: int, work: Workload, max_tokens: int, drain_s: float
) -> tuple[list[Result], float]:
    """Send every request at its arrival time (whatever is still running); wait for all
    of them (at most ``drain_s`` after the last arrival). Returns the results and the
    largest delay of a send behind its schedule (this client's own lag)."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    results = [Result(i) for i in range(len(work.prompts))]
    lag = 0.0
    async with httpx.AsyncClient(timeout=drain_s + 60, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for i, at in enumerate(work.arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - (t0 + at))
            body = request_body(work.prompts[i], max_tokens)
            tasks.append(asyncio.create_task(stream_one(client, url, body, results[i])))
        _, late = await asyncio.wait(tasks, timeout=drain_s)
        for task in late:
            task.cancel()
        for i, r in enumerate(results):
            if math.isnan(r.end) and r.error is None:
                results[i].error = f"not done {drain_s:.0f} s after the last arrival"
    return results, lag


async def closed_loop(
    port: int, work: Workload, max_tokens: int, clients: int
) -> tuple[list[Result], float]:
    """``clients`` clients take the requests in order, each sending its next one when its
    previous answer is done."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    results = [Result(i) for i in range(len(work.prompts))]
    queue = list(range(len(work.prompts)))[::-1]
    async with httpx.AsyncClient(timeout=600) as client:

        async def one_client() -> None:
            while queue:
                i = queue.pop()
                await stream_one(client, url, request_body(work.prompts[i], max_tokens), results[i])

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return results, 0.0


# --- one phase: one mode with fresh workers -------------------------------------------------


MODE_ARGS = {
    "kv": ["--router-mode", "kv"],
    "kv-predicted": ["--router-mode", "kv", "--no-kv-events"],
    "round-robin": ["--router-mode", "round-robin"],
    "random": ["--router-mode", "random"],
}


def mode_args(mode: str) -> list[str]:
    weighted = re.fullmatch(r"kv-w([0-9.]+)", mode)
    if weighted:
        return ["--router-mode", "kv", "--kv-overlap-score-weight", weighted.group(1)]
    if mode not in MODE_ARGS:
        raise SystemExit(f"bench_kv_routing: unknown mode {mode!r}")
    return MODE_ARGS[mode]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def per_instance(
    values: dict[str, float], name: str, before: dict[str, float] | None = None
) -> dict[str, float]:
    """A series per worker instance (less its value in ``before``)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith(name + "{") and 'instance="' in key:
            instance = key.split('instance="', 1)[1].split('"', 1)[0]
            value -= (before or {}).get(key, 0.0)
            out[instance] = out.get(instance, 0.0) + value
    return out


@dataclass
class Phase:
    """How to run one part's phases (workers, engine, load)."""

    part: str
    out: str  # worker engine
    engine_args: dict[str, object]
    workers: int
    max_tokens: int
    run: object  # async callable (port, workload) -> (results, lag)
    env: dict[str, str] = field(default_factory=dict)


class Bench:
    def __init__(self, cluster: Cluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.count = 0
        self.env: dict[str, str] = {}
        engines = args.tree / "engines" / "llamacpp"
        if args.tree != ROOT and engines.is_dir():
            # The tree's llama.cpp engine rather than the editable install of this checkout's.
            self.env["PYTHONPATH"] = str(engines)

    def worker(self, ns: str, name: str, phase: Phase) -> Target:
        path = self.cluster.tmp / f"{name}.json"
        path.write_text(json.dumps(phase.engine_args))
        argv = [PY, "-m", "dynamo_run", f"in=dyn://{ns}.backend.generate", f"out={phase.out}"]
        argv += ["--nats-url", self.cluster.nats_url, "--extra-engine-args", str(path)]
        env = {**self.env, **phase.env}
        return Target(name, argv, 0, "", env=env, ready_text=" serving ", cwd=self.args.tree)

    def run(self, phase: Phase, mode: str, work: Workload, rnd: int) -> dict:
        self.count += 1
        ns = f"kvb{os.getpid()}n{self.count}"  # fresh: cold caches, no old KV events
        tag = f"{phase.part}-{mode}-r{rnd}"
        workers = self.cluster.start_all(
            [self.worker(ns, f"{tag}-w{i}", phase) for i in range(phase.workers)]
        )
        target = self.cluster.http(f"{tag}-frontend", f"dyn://{ns}.backend.generate")
        target.argv += mode_args(mode)
        target.env = {**target.env, **self.env}
        front = self.cluster.start(target)
        try:
            wait_instances(front, phase.workers)
            # One short request, no document in it: the frontend's first request pays for
            # loading its tokenizer and template, which should not count as routing.
            warm = Workload([], ["Hello, warm-up."], [0], [0.0], 0, 0)
            asyncio.run(closed_loop(front.port, warm, 2, 1))
            before = scrape(front.port)  # counters are reported net of the warm-up
            ours = [*workers, front, self.cluster.nats]
            cpu0 = sum(p.cpu_seconds() for p in ours)
            busy0, mine0, load0 = machine_busy_seconds(), sum(os.times()[:2]), os.getloadavg()[0]
            t0 = time.perf_counter()
            results, lag = asyncio.run(phase.run(front.port, work))  # type: ignore[operator]
            wall = time.perf_counter() - t0
            used = sum(p.cpu_seconds() for p in ours) - cpu0
            mine = sum(os.times()[:2]) - mine0
            other = max(0.0, machine_busy_seconds() - busy0 - used - mine) / wall
            metrics = scrape(front.port)
        finally:
            self.cluster.stop(front)
            for w in workers:
                self.cluster.stop(w)
        row = summarise(results, work, metrics, before)
        row.update(
            part=phase.part,
            mode=mode,
            round=rnd,
            load_avg=load0,
            other_cores=other,
            ours_cores=(used + mine) / wall,
            client_lag_ms=1000 * lag,
        )
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row


def summarise(
    results: list[Result], work: Workload, metrics: dict[str, float], before: dict[str, float]
) -> dict:
    done = [r for r in results if r.error is None and not math.isnan(r.ttft)]
    errors = [r.error for r in results if r.error is not None]
    ttfts = sorted(r.ttft for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    tokens = sum(r.completion_tokens for r in done)
    span = max((r.end for r in done), default=0) - min((r.start for r in done), default=0)
    reported = sum(
        per_instance(
            metrics, "dynamo_frontend_worker_reported_cached_tokens_total", before
        ).values()
    )
    predicted = sum(
        per_instance(
            metrics, "dynamo_frontend_worker_predicted_cached_tokens_total", before
        ).values()
    )
    spread = sorted(
        int(v)
        for v in per_instance(metrics, "dynamo_frontend_worker_requests_total", before).values()
    )
    # A request "hits" when it finds at least its document's full blocks but one cached.
    doc_blocks = int(work.prefix_tokens // BLOCK) - 1
    hit = [r.cached_tokens >= doc_blocks * BLOCK for r in done]
    hits = sum(hit)
    ttft_hit = sorted(r.ttft for r, h in zip(done, hit, strict=True) if h)
    ttft_miss = sorted(r.ttft for r, h in zip(done, hit, strict=True) if not h)
    return {
        "requests": len(results),
        "done": len(done),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_p50_ms": 1000 * pct(ttfts, 50),
        "ttft_p90_ms": 1000 * pct(ttfts, 90),
        "ttft_p99_ms": 1000 * pct(ttfts, 99),
        "ttft_mean_ms": 1000 * statistics.mean(ttfts) if ttfts else math.nan,
        "ttft_hit_p50_ms": 1000 * pct(ttft_hit, 50),
        "ttft_miss_p50_ms": 1000 * pct(ttft_miss, 50),
        "tokens_per_s": tokens / span if span > 0 else math.nan,
        "span_s": span,
        "hit_rate": cached / prompt if prompt else math.nan,
        "hit_rate_metrics": reported / prompt if prompt else math.nan,
        "predicted_share": predicted / prompt if prompt else math.nan,
        "hit_requests": hits / len(done) if done else math.nan,
        "prompt_tokens_mean": prompt / len(done) if done else math.nan,
        "spread": spread,
    }


# --- the report -----------------------------------------------------------------------------


def med(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return statistics.median(values) if values else math.nan


def join(values: list[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def table(rows: list[dict], modes: list[str]) -> list[str]:
    lines = [
        "| mode | TTFT p50 ms | TTFT p99 ms | tokens/s | cache hit (usage) | cache hit "
        "(/metrics) | requests that hit | TTFT p50 ms of hits / misses | requests per worker "
        "| TTFT p50 per round | errors | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        spreads = " / ".join("-".join(str(n) for n in r["spread"]) for r in mine)
        lines.append(
            f"| {mode} | **{med(mine, 'ttft_p50_ms'):.0f}** | {med(mine, 'ttft_p99_ms'):.0f} | "
            f"{med(mine, 'tokens_per_s'):.1f} | {100 * med(mine, 'hit_rate'):.1f}% | "
            f"{100 * med(mine, 'hit_rate_metrics'):.1f}% | "
            f"{100 * med(mine, 'hit_requests'):.0f}% | {med(mine, 'ttft_hit_p50_ms'):.0f} / "
            f"{med(mine, 'ttft_miss_p50_ms'):.0f} | {spreads} | "
            f"{join([r['ttft_p50_ms'] for r in mine], '.0f')} | "
            f"{sum(r['errors'] for r in mine)} | {join([r['other_cores'] for r in mine], '.1f')} |"
        )
    return lines


def ratios(rows: list[dict], mode: str, base: str) -> str:
    """Per-round ratios of ``mode`` against ``base`` (TTFT p50, tokens/s), and their median."""
    by_round: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["mode"]] = r
    pairs = [(x[mode], x[base]) for x in by_round.values() if mode in x and base in x]
    if not pairs:
        return f"- {mode} against {base}: no round has both"
    ttft = [a["ttft_p50_ms"] / b["ttft_p50_ms"] for a, b in pairs]
    p99 = [a["ttft_p99_ms"] / b["ttft_p99_ms"] for a, b in pairs]
    tps = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
    return (
        f"- {mode} against {base} (per round, median of {len(pairs)}): TTFT p50 "
        f"**{statistics.median(ttft):.2f}x** ({join(ttft, '.2f')}), TTFT p99 "
        f"{statistics.median(p99):.2f}x ({join(p99, '.2f')}), tokens/s "
        f"**{statistics.median(tps):.3f}x** ({join(tps, '.3f')})"
    )


def rounds(bench: Bench, phase: Phase, modes: list[str], work: Workload, n: int) -> list[dict]:
    rows = []
    for rnd in range(n):
        wait_quiet(bench.args.quiet_wait)
        order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
        for mode in order:
            rows.append(bench.run(phase, mode, work, rnd))
    return rows


def part_mocker(bench: Bench, tokenizer) -> list[str]:  # type: ignore[no-untyped-def]
    args = bench.args
    probe = make_workload(
        tokenizer, args.seed, args.prefixes, args.prefix_tokens, args.question_tokens, 64, None
    )
    cap = capacity(args, probe.prompt_tokens)
    rate = args.load * cap
    n = max(1, round(rate * args.duration))
    work = make_workload(
        tokenizer, args.seed, args.prefixes, args.prefix_tokens, args.question_tokens, n, rate
    )
    engine = {
        "prefill_ms_per_token": args.prefill_ms,
        "decode_ms_base": args.decode_ms_base,
        "decode_ms_per_seq": args.decode_ms_per_seq,
        "speedup_ratio": args.speedup,
        "num_gpu_blocks": args.blocks,
    }

    async def run(port: int, w: Workload) -> tuple[list[Result], float]:
        return await open_loop(port, w, args.max_tokens, args.drain)

    phase = Phase("mocker", "mocker", engine, args.workers, args.max_tokens, run)
    rows = rounds(bench, phase, args.modes, work, args.rounds)
    doc_blocks = int(work.prefix_tokens // BLOCK)
    ceiling = (n - work.first_uses()) / n * doc_blocks * BLOCK / work.prompt_tokens
    one_prefill = work.prompt_tokens * args.prefill_ms / args.speedup
    pool_docs = args.blocks / (work.prefix_tokens / BLOCK)
    lines = [
        f"Workers: {args.workers} x `out=mocker` `{json.dumps(engine)}` (other settings the "
        f"mocker's defaults: block 16 tokens, max_num_seqs 256, max_num_batched_tokens 8192). "
        f"Workload (seed {args.seed}): {args.prefixes} documents of {work.prefix_tokens:.0f} "
        f"tokens, {n} requests of {work.prompt_tokens:.0f} prompt tokens on average (a document "
        f"at random + a unique {args.question_tokens}-token question), {args.max_tokens} tokens "
        f"out (ignore_eos), `/v1/completions` streamed. A cold prompt costs "
        f"{one_prefill:.0f} ms of prefill; a worker's pool ({args.blocks} blocks) holds "
        f"{pool_docs:.1f} documents, the {args.workers} pools together "
        f"{args.workers * pool_docs:.1f} of the {args.prefixes}.",
        "",
        f"Capacity without cache hits, from the cost model (`capacity()` in the script: "
        f"λ < 1 / (P x prefill_ms + D x decode_ms_per_seq) per worker, times speedup): "
        f"{cap:.2f} requests/s for {args.workers} workers; arrivals: Poisson at "
        f"{args.load:.0%} of it, **{rate:.2f} requests/s** for {args.duration:g} s "
        f"(~{rate * args.max_tokens:.0f} output tokens/s offered). Hit-rate ceiling "
        f"(every document's full blocks cached from its second use on): {ceiling:.1%}.",
        "",
        *table(rows, args.modes),
        "",
    ]
    for mode in args.modes:
        if mode != "round-robin" and "round-robin" in args.modes:
            lines.append(ratios(rows, mode, "round-robin"))
    lag = max(r["client_lag_ms"] for r in rows)
    lines.append(
        f"- goal: kv's TTFT p50 at most 0.5x round-robin's, tokens/s not lower. Largest delay "
        f"of a send behind its schedule (this client): {lag:.0f} ms; load average at the "
        f"phases' starts {join(sorted(r['load_avg'] for r in rows), '.1f')}; our processes "
        f"used {join([r['ours_cores'] for r in rows], '.2f')} cores per phase."
    )
    return lines


def part_llamacpp(bench: Bench, tokenizer) -> list[str]:  # type: ignore[no-untyped-def]
    args = bench.args
    work = make_workload(
        tokenizer,
        args.seed,
        args.llama_prefixes,
        args.llama_prefix_tokens,
        args.llama_question_tokens,
        args.llama_requests,
        None,
    )
    engine = {
        "n_parallel": args.llama_parallel,
        "n_threads": 1,
        "prompt_cache_mib": args.llama_prompt_cache_mib,
    }

    async def run(port: int, w: Workload) -> tuple[list[Result], float]:
        return await closed_loop(port, w, args.llama_max_tokens, args.llama_clients)

    phase = Phase("llamacpp", "llamacpp", engine, 2, args.llama_max_tokens, run)
    rows = rounds(bench, phase, args.llama_modes, work, args.llama_rounds)
    doc_blocks = int(work.prefix_tokens // BLOCK)
    n = len(work.prompts)
    ceiling = (n - work.first_uses()) / n * doc_blocks * BLOCK / work.prompt_tokens
    lines = [
        f"Workers: 2 x `out=llamacpp` on the default model `{json.dumps(engine)}`. Workload "
        f"(seed {args.seed}): {args.llama_prefixes} documents of {work.prefix_tokens:.0f} "
        f"tokens, {n} requests of {work.prompt_tokens:.0f} prompt tokens on average, "
        f"{args.llama_max_tokens} tokens out; **closed loop, {args.llama_clients} clients** "
        f"(not open-loop arrivals: 2 CPU cores run everything). Hit-rate ceiling: "
        f"{ceiling:.1%}.",
        "",
        *table(rows, args.llama_modes),
        "",
    ]
    for mode in args.llama_modes:
        if mode != "round-robin" and "round-robin" in args.llama_modes:
            lines.append(ratios(rows, mode, "round-robin"))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="mocker,llamacpp")
    parser.add_argument("--rounds", type=int, default=2, help="mocker: rounds of every mode")
    parser.add_argument("--modes", default="kv,round-robin,random")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--prefixes", type=int, default=32, help="shared documents")
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--question-tokens", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the capacity")
    parser.add_argument("--duration", type=float, default=35.0, help="seconds of arrivals")
    parser.add_argument("--drain", type=float, default=60.0, help="wait after the last arrival")
    parser.add_argument("--prefill-ms", type=float, default=0.1, help="per uncached token")
    parser.add_argument("--decode-ms-base", type=float, default=10.0)
    parser.add_argument("--decode-ms-per-seq", type=float, default=0.5)
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--blocks", type=int, default=2048, help="mocker num_gpu_blocks")
    parser.add_argument("--llama-modes", default="kv,kv-predicted,round-robin")
    parser.add_argument("--llama-rounds", type=int, default=1)
    parser.add_argument("--llama-prefixes", type=int, default=8)
    parser.add_argument("--llama-prefix-tokens", type=int, default=192)
    parser.add_argument("--llama-question-tokens", type=int, default=16)
    parser.add_argument("--llama-requests", type=int, default=40)
    parser.add_argument("--llama-clients", type=int, default=2)
    parser.add_argument("--llama-max-tokens", type=int, default=8)
    parser.add_argument("--llama-parallel", type=int, default=2)
    parser.add_argument("--llama-prompt-cache-mib", type=int, default=16)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each round, wait up to S seconds for other sessions' load to pause",
    )
    parser.add_argument("--tree", type=Path, default=ROOT, metavar="DIR")
    parser.add_argument("--out", type=Path, help="append the markdown report here")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.llama_modes = [m.strip() for m in args.llama_modes.split(",") if m.strip()]
    for mode in args.modes + args.llama_modes:
        mode_args(mode)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.tree = args.tree.resolve()
    tokenizer = load_tokenizer(args.tree)

    load0, t0 = os.getloadavg(), time.perf_counter()
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-kvr-") as tmp:
        cluster = Cluster(Path(tmp), args.tree)
        bench = Bench(cluster, args)
        try:
            if "mocker" in parts:
                report += ["#### Mocker workers, open loop", "", *part_mocker(bench, tokenizer), ""]
            if "llamacpp" in parts:
                report += [
                    "#### llama.cpp workers, default model",
                    "",
                    *part_llamacpp(bench, tokenizer),
                    "",
                ]
        finally:
            cluster.stop_all()
    wall = time.perf_counter() - t0
    head = [
        f"### bench_kv_routing {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`{' '.join(['scripts/bench_kv_routing.py', *sys.argv[1:]])}`: {CORES} CPUs, load "
        f"average {load0[0]:.1f} at start, {wall:.0f} s in all; one nats-server on loopback; "
        f"every phase its own workers and frontend in a fresh namespace (cold caches).",
        "",
    ]
    emit_report("\n".join(head + report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
