#!/usr/bin/env python
"""Overload benchmark (issue 18): one mocker worker that decodes 8 sequences at a time, one
frontend, and far more streaming clients than it can serve.

A nats-server on a free loopback port, ``in=dyn://bench.overload.generate out=mocker``
(``max_num_seqs`` 8) and ``in=http out=dyn://bench.overload.generate``; every process is
stopped at the end. Phases:

  idle     one short request (``--short-tokens``, 8) at a time: its latency to ``[DONE]``,
           and /health's.
  load     ``--clients`` (400) streaming clients, each in a closed loop for ``--load-s``
           seconds (``--max-tokens`` per answer); a client answered 503 waits its
           ``Retry-After`` and tries again, as the openai client does. /health is probed
           every 100 ms meanwhile from another process (this one's event loop is busy with
           the clients, which would add its own lag to the figure); the time the server
           took to answer each 503 comes from its access log.
  hang-up  every client disconnects at once; right away one short request, then one more
           each second: how long abandoned work keeps the worker busy.

Printed: p50/p99 latency of the answered requests, the share answered 503, the short
request's latency after the hang-up against the idle one, and /health's latency.

    .venv/bin/python scripts/bench_overload.py [--clients 400] [--load-s 15]
        [--max-tokens 32] [--tree DIR] [--frontend-args "--router-queue-limit 16"]
        [--out FILE.md]

``--tree DIR`` runs DIR's ``dynamo_run`` (e.g. ``git archive BASE dynamo_run | tar -x -C
DIR``), to measure the code before a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
from bench_servers import PY, ROOT, ServerProcess, Target, emit_report, free_port

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENDPOINT = "bench.overload.generate"

# /health every 100 ms, each latency (seconds) a line on stdout, until killed.
PROBE = """
import http.client, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
while True:
    start = time.perf_counter()
    conn.request("GET", "/health")
    conn.getresponse().read()
    print(time.perf_counter() - start, flush=True)
    time.sleep(0.1)
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def body(max_tokens: int, i: int = 0) -> dict[str, object]:
    return {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": f"Tell me story number {i}."}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def one(
    http: httpx.AsyncClient, url: str, max_tokens: int, i: int = 0
) -> tuple[int, float, float]:
    """(status, seconds to the end of the answer, Retry-After) of one streamed request."""
    start = time.perf_counter()
    async with http.stream("POST", url + "/chat/completions", json=body(max_tokens, i)) as res:
        async for _ in res.aiter_lines():
            pass
        retry = float(res.headers.get("retry-after", "0") or 0)
        return res.status_code, time.perf_counter() - start, retry


async def short_latency(http: httpx.AsyncClient, url: str, tokens: int) -> float:
    status, seconds, _ = await one(http, url, tokens)
    assert status == 200, status
    return seconds


async def health_latency(http: httpx.AsyncClient, root: str) -> float:
    start = time.perf_counter()
    res = await http.get(root + "/health")
    res.raise_for_status()
    return time.perf_counter() - start


def client_share(
    url: str, first: int, count: int, total: int, stop_at: float, args: argparse.Namespace
) -> tuple[list[float], dict[int, int], list[float]]:
    """Clients ``first`` .. ``first + count - 1`` of ``total``, in this (child) process until
    ``stop_at`` (time.time()), then all hung up at once: (latencies of the answered
    requests, count by status, seconds to each refusal)."""

    async def run() -> tuple[list[float], dict[int, int], list[float]]:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        rejected_s: list[float] = []
        limits = httpx.Limits(max_connections=count + 5, max_keepalive_connections=count)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as http:

            async def client(i: int) -> None:
                await asyncio.sleep(i * args.ramp_s / total)
                n = 0
                while True:
                    try:
                        status, seconds, retry = await one(http, url, args.max_tokens, i * 1000 + n)
                    except httpx.HTTPError:
                        status, seconds, retry = 0, 0.0, 1.0
                    n += 1
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(seconds)
                    else:
                        rejected_s.append(seconds)
                        await asyncio.sleep(retry or 1.0)

            tasks = [asyncio.create_task(client(first + k)) for k in range(count)]
            await asyncio.sleep(max(0.0, stop_at - time.time()))
            # Hang up: every client's connection closes now, mid-answer or mid-wait.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return latencies, statuses, rejected_s

    return asyncio.run(run())


async def scenario(args: argparse.Namespace, url: str, root: str, port: int) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as probe:
        for _ in range(3):  # warm up
            await short_latency(probe, url, args.short_tokens)
        idle = [await short_latency(probe, url, args.short_tokens) for _ in range(7)]
        idle_health = [await health_latency(probe, root) for _ in range(20)]

        # The clients run in several processes: one Python process driving 400 of them
        # would add its own lag to every figure.
        procs = max(1, min(args.client_procs, args.clients))
        shares = [args.clients // procs + (k < args.clients % procs) for k in range(procs)]
        firsts = [sum(shares[:k]) for k in range(procs)]
        loop = asyncio.get_running_loop()
        prober = subprocess.Popen([PY, "-c", PROBE, str(port)], stdout=subprocess.PIPE, text=True)
        stop_at = time.time() + 1.0 + args.load_s  # the processes start within the second
        with ProcessPoolExecutor(procs) as pool:
            futures = [
                loop.run_in_executor(
                    pool, client_share, url, first, count, args.clients, stop_at, args
                )
                for first, count in zip(firsts, shares, strict=True)
            ]
            results = await asyncio.gather(*futures)
        prober.terminate()
        health = [float(line) for line in prober.communicate()[0].split()]
        after = []
        for _ in range(args.after_probes):
            after.append(await short_latency(probe, url, args.short_tokens))
            await asyncio.sleep(max(0.0, 1.0 - after[-1]))

    latencies = [x for r in results for x in r[0]]
    rejected_s = [x for r in results for x in r[2]]
    statuses: dict[int, int] = {}
    for r in results:
        for status, n in r[1].items():
            statuses[status] = statuses.get(status, 0) + n
    answered = statuses.get(200, 0)
    total = sum(statuses.values())
    return {
        "idle_short_s": statistics.median(idle),
        "idle_health_ms": 1000 * statistics.median(idle_health),
        "answered": answered,
        "requests": total,
        "statuses": dict(sorted(statuses.items())),
        "share_503": statuses.get(503, 0) / total if total else 0.0,
        "rejected_p50_ms": 1000 * pct(rejected_s, 0.5) if rejected_s else None,
        "rejected_p99_ms": 1000 * pct(rejected_s, 0.99) if rejected_s else None,
        "p50_s": pct(latencies, 0.5),
        "p99_s": pct(latencies, 0.99),
        "health_p50_ms": 1000 * pct(health, 0.5),
        "health_p99_ms": 1000 * pct(health, 0.99),
        "health_max_ms": 1000 * max(health) if health else None,
        "after_hangup_s": after,
    }


def server_503_ms(log: Path) -> list[float] | None:
    """p50 and p99 of the time the frontend took to answer a 503 (its access log)."""
    pattern = re.compile(r'"POST /v1/chat/completions" 503 ([0-9.]+)ms')
    times = [float(m) for m in pattern.findall(log.read_text(errors="replace"))]
    return [pct(times, 0.5), pct(times, 0.99)] if times else None


def report(args: argparse.Namespace, r: dict[str, object]) -> str:
    idle = float(r["idle_short_s"])  # type: ignore[arg-type]
    after = [float(x) for x in r["after_hangup_s"]]  # type: ignore[union-attr]
    rej, rej99, server = r["rejected_p50_ms"], r["rejected_p99_ms"], r["server_503_ms"]
    rejected = "-"
    if rej is not None and server:
        rejected = (
            f"{server[0]:.1f} / {server[1]:.1f} ms at the server, "  # type: ignore[index]
            f"{float(rej):.0f} / {float(rej99):.0f} ms at the client"  # type: ignore[arg-type]
        )
    lines = [
        f"### bench_overload {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
        f" ({args.label or 'this tree'})",
        "",
        f"1 mocker worker (max_num_seqs {args.max_num_seqs}), {args.clients} streaming clients "
        f"for {args.load_s:g} s, {args.max_tokens} tokens per answer; frontend args "
        f"`{args.frontend_args or '(none)'}`",
        "",
        "| figure | value |",
        "|---|---|",
        f"| answered (200) / requests | {r['answered']} / {r['requests']} {r['statuses']} |",
        f"| 503 share | {100 * float(r['share_503']):.1f} % |",  # type: ignore[arg-type]
        f"| latency of answered requests p50 / p99 | {float(r['p50_s']):.2f} s / "  # type: ignore[arg-type]
        f"{float(r['p99_s']):.2f} s |",  # type: ignore[arg-type]
        f"| time to a 503, p50 / p99 | {rejected} |",
        f"| {args.short_tokens}-token request, idle | {idle:.3f} s |",
        "| same right after the hang-up (then +1 s, +2 s...) | "
        + ", ".join(f"{x:.3f} s" for x in after)
        + f" ({after[0] / idle:.1f}x idle) |",
        f"| CPU of the frontend / the worker over the run | {float(r['frontend_cores']):.2f} / "  # type: ignore[arg-type]
        f"{float(r['worker_cores']):.2f} cores |",
        f"| /health idle p50 | {float(r['idle_health_ms']):.1f} ms |",  # type: ignore[arg-type]
        f"| /health under load p50 / p99 / max | {float(r['health_p50_ms']):.1f} / "  # type: ignore[arg-type]
        f"{float(r['health_p99_ms']):.1f} / {float(r['health_max_ms']):.1f} ms |",  # type: ignore[arg-type]
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--load-s", type=float, default=15.0)
    parser.add_argument("--ramp-s", type=float, default=1.0, help="clients start over this time")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--after-probes", type=int, default=3)
    parser.add_argument("--client-procs", type=int, default=8, help="processes the clients run in")
    parser.add_argument("--tree", type=Path, help="run this folder's dynamo_run")
    parser.add_argument("--frontend-args", default="")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from dynamo_run.distributed.nats_binary import nats_server_path

    cwd = args.tree.resolve() if args.tree else ROOT
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        tmpdir = Path(tmp)
        nats_port, http_port = free_port(), free_port()
        nats_url = f"nats://127.0.0.1:{nats_port}"
        engine_args = tmpdir / "engine.json"
        engine_args.write_text(json.dumps({"max_num_seqs": args.max_num_seqs}))
        nats = Target(
            "nats", [nats_server_path(), "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd",
                     str(tmpdir / "js")], nats_port, "", ready_text="Server is ready",
        )  # fmt: skip
        worker = Target(
            "worker",
            [PY, "-m", "dynamo_run", f"in=dyn://{ENDPOINT}", "out=mocker", "--nats-url", nats_url,
             "--extra-engine-args", str(engine_args)],
            0, "", ready_text="serving", cwd=cwd,
        )  # fmt: skip
        front = Target(
            "frontend",
            [PY, "-m", "dynamo_run", "in=http", f"out=dyn://{ENDPOINT}", "--nats-url", nats_url,
             "--http-port", str(http_port), *shlex.split(args.frontend_args)],
            http_port, "/health", cwd=cwd,
        )  # fmt: skip
        with ServerProcess(nats, tmpdir / "nats.log") as _n:
            _n.wait_ready()
            with ServerProcess(worker, tmpdir / "worker.log") as w:
                w.wait_ready()
                with ServerProcess(front, tmpdir / "frontend.log") as f:
                    f.wait_ready()
                    root = f"http://127.0.0.1:{http_port}"
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:  # the model is listed once discovered
                        if httpx.get(root + "/v1/models").json().get("data"):
                            break
                        time.sleep(0.1)
                    cpu = f.cpu_seconds(), w.cpu_seconds(), time.perf_counter()
                    result = asyncio.run(scenario(args, root + "/v1", root, http_port))
                    wall = time.perf_counter() - cpu[2]
                    result["frontend_cores"] = (f.cpu_seconds() - cpu[0]) / wall
                    result["worker_cores"] = (w.cpu_seconds() - cpu[1]) / wall
                    result["server_503_ms"] = server_503_ms(tmpdir / "frontend.log")
    print(json.dumps(result, indent=1), file=sys.stderr)
    emit_report(report(args, result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
