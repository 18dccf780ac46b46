#!/usr/bin/env python
"""``dynamo-run in=http out=vllm`` against vLLM's own OpenAI server, same model, same
settings, same load.

Both serve the default model as an HF folder (tests/hf_model.py makes it from the GGUF),
bfloat16, max_model_len 2048, eager mode, prefix caching on, ``VLLM_CPU_KVCACHE_SPACE``
1 GiB. Each server is started once and measured with 1, then 4 concurrent clients looping
streamed ``/v1/completions`` (greedy, ``ignore_eos``, 64 tokens) for a fixed time; tokens
are counted from the usage each stream ends with. Reports tokens/s and TTFT, and our ratios
to vLLM's server (goal: >= 0.95x its tokens/s, TTFT no worse).

Usage: .venv/bin/python scripts/bench_vllm.py [--duration 20] [--out docs/bench.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_http import MODEL_PROMPT, _pct
from bench_servers import PY, ROOT, ServerProcess, Target, emit_report, free_port

sys.path.insert(0, str(ROOT / "tests"))
from hf_model import default_hf_folder

CONTEXT = 2048
ENV = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def targets(folder: Path) -> list[Target]:
    ours, theirs = free_port(), free_port()
    dynamo = [
        PY, "-m", "dynamo_run", "in=http", "out=vllm", str(folder),
        "--context-length", str(CONTEXT), "--http-port", str(ours),
    ]  # fmt: skip
    vllm = [
        PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--dtype", "bfloat16", "--max-model-len", str(CONTEXT), "--enforce-eager",
        "--enable-prefix-caching", "--host", "127.0.0.1", "--port", str(theirs),
    ]  # fmt: skip
    return [
        Target("dynamo-run out=vllm", dynamo, ours, "/health", env=ENV),
        Target("vllm api_server", vllm, theirs, "/health", env=ENV),
    ]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(TTFT, tokens) of one streamed completion; tokens from the final usage chunk."""
    start = time.perf_counter()
    first: float | None = None
    tokens = chunks = 0
    async with client.stream("POST", url, json=body) as res:
        if res.status_code != 200:
            raise RuntimeError(f"HTTP {res.status_code}: {(await res.aread())[:300]!r}")
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            choices = data.get("choices") or []
            if choices and choices[0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    return (first or time.perf_counter()) - start, tokens or chunks


async def measure(url: str, body: dict, clients: int, duration: float) -> dict[str, float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        await one_request(client, url, body)  # warm-up
        ttfts: list[float] = []
        tokens = 0
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                ttft, n = await one_request(client, url, body)
                ttfts.append(ttft)
                tokens += n

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ttfts.sort()
    return {
        "requests": len(ttfts),
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": 1000 * _pct(ttfts, 50),
        "ttft_p90_ms": 1000 * _pct(ttfts, 90),
    }


def model_id(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load level")
    parser.add_argument("--clients", default="1,4", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also append the markdown report here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    folder = default_hf_folder()
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        for target in targets(folder):
            running = ServerProcess(target, Path(tmp) / f"{target.port}.log")
            try:
                start = time.monotonic()
                running.wait_ready(timeout=900)
                print(f"{target.name}: ready in {time.monotonic() - start:.0f} s", file=sys.stderr)
                body = {
                    "model": model_id(target.port),
                    "prompt": MODEL_PROMPT,
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                url = f"http://127.0.0.1:{target.port}/v1/completions"
                results[target.name] = {
                    n: asyncio.run(measure(url, body, n, args.duration)) for n in levels
                }
            finally:
                running.stop()
    ours, theirs = (results[t.name] for t in targets(folder))
    lines = [
        f"### vLLM: dynamo-run in=http out=vllm vs vLLM's OpenAI server ({time.strftime('%Y-%m-%d')})",
        "",
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, vLLM CPU build, "
        f"{folder.name}, greedy, {args.max_tokens} tokens with ignore_eos, "
        f"{args.duration:g} s per level",
        "",
        "| server | clients | requests | tokens/s | TTFT p50 ms | TTFT p90 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_level in results.items():
        for n, r in by_level.items():
            lines.append(
                f"| {name} | {n} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                f"{r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} |"
            )
    lines.append("")
    for n in levels:
        lines.append(
            f"- {n} client(s): tokens/s {ours[n]['tokens_per_s'] / theirs[n]['tokens_per_s']:.3f}x "
            f"vLLM's server, TTFT p50 {ours[n]['ttft_p50_ms'] / theirs[n]['ttft_p50_ms']:.2f}x"
        )
    emit_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
