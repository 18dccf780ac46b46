#!/usr/bin/env python
"""Streaming over KServe gRPC against HTTP SSE, on the same engine and load.

One ``dynamo-run in=http,grpc`` process per engine serves both protocols from one pipeline, so
only the protocol differs. N clients each loop streamed requests for a fixed time: HTTP posts
``/v1/completions`` with ``stream: true`` (httpx, like bench_http.py); gRPC sends
ModelStreamInfer requests with ``stream=true`` on one long-lived stream per client
(tritonclient.grpc.aio, as a Triton user would). Each records the time to the first text and
the text chunks (tokens) per second. Runs alternate between the protocols (``--repeats``);
the best run of each is shown, since the machine is shared.

Engines: echo (delay 0: the per-token cost of each protocol) and llamacpp on the default model
(greedy, ignore_eos, fixed max_tokens). Loads: 1 and 4 streams.

``--floor`` measures grpcio itself instead: one bare ``grpc.aio`` stream yielding
pre-serialized 7-byte messages, client and server in this process (the least a streamed
message costs in Python).

Usage: .venv/bin/python scripts/bench_grpc.py [--engines echo,llamacpp] [--floor] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc.aio as tca
from bench_servers import PY, ServerProcess, Target, emit_report, free_port
from tritonclient.grpc import InferInput

MODEL = "SmolLM2-135M-Instruct"
MODEL_PROMPT = "Once upon a time, in a small village by the sea, there lived"
CORES = len(os.sched_getaffinity(0))


@dataclass
class Sample:
    ttft: float
    tokens: int


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))]


# --- one streamed request per protocol ----------------------------------------------------


async def http_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", url, json=body) as res:
        if res.status_code != 200:
            raise RuntimeError(f"HTTP {res.status_code}: {(await res.aread())[:300]!r}")
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                first = first or time.perf_counter()
                tokens += 1
    return Sample((first or time.perf_counter()) - start, tokens)


class GrpcStream:
    """One client's long-lived ModelStreamInfer stream: a request at a time."""

    def __init__(self, client: tca.InferenceServerClient, prompt: str, params: dict[str, Any]):
        text = InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        stream = InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        self.request = {"model_name": MODEL, "inputs": [text, stream], "parameters": params}
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.responses = client.stream_infer(self._requests())

    async def _requests(self) -> AsyncIterator[dict[str, Any]]:
        while (item := await self.queue.get()) is not None:
            yield item

    async def one(self) -> Sample:
        start = time.perf_counter()
        first: float | None = None
        tokens = 0
        self.queue.put_nowait(dict(self.request))
        async for result, error in self.responses:
            if error is not None:
                raise RuntimeError(f"gRPC: {error}")
            if result.as_numpy("text_output")[0]:
                first = first or time.perf_counter()
                tokens += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        return Sample((first or time.perf_counter()) - start, tokens)

    def close(self) -> None:
        self.queue.put_nowait(None)


# --- load ---------------------------------------------------------------------------------


async def drive(
    make: Callable[[], Awaitable[Callable[[], Awaitable[Sample]]]], clients: int, duration: float
) -> dict[str, float]:
    """``clients`` loops of requests for ``duration`` seconds, after one warm-up each."""
    senders = [await make() for _ in range(clients)]
    await asyncio.gather(*(send() for send in senders))  # warm-up
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + duration

    async def loop(send: Callable[[], Awaitable[Sample]]) -> None:
        while time.perf_counter() < deadline:
            samples.append(await send())

    await asyncio.gather(*(loop(send) for send in senders))
    elapsed = time.perf_counter() - start
    ttfts = sorted(s.ttft for s in samples)
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "tokens_per_request": tokens / max(1, len(samples)),
        "ttft_p50_ms": 1000 * _pct(ttfts, 50),
        "ttft_p99_ms": 1000 * _pct(ttfts, 99),
        "tokens_per_s": tokens / elapsed,
    }


async def run_http(port: int, body: dict[str, Any], clients: int, duration: float) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def make() -> Callable[[], Awaitable[Sample]]:
            return lambda: http_request(client, url, body)

        return await drive(make, clients, duration)


async def run_grpc(
    port: int, prompt: str, params: dict[str, Any], clients: int, duration: float
) -> dict:
    client = tca.InferenceServerClient(f"127.0.0.1:{port}")
    streams: list[GrpcStream] = []

    async def make() -> Callable[[], Awaitable[Sample]]:
        stream = GrpcStream(client, prompt, params)
        streams.append(stream)
        return stream.one

    try:
        return await drive(make, clients, duration)
    finally:
        for stream in streams:
            stream.close()
        await client.close()


# --- grpcio's floor -------------------------------------------------------------------------


async def grpc_floor(messages: int) -> str:
    """Messages per second and CPU per message of a bare grpc.aio stream."""
    import grpc

    message = b"\x12\x05hello"

    async def handler(requests: Any, context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            for _ in range(messages):
                yield message
            return

    server = grpc.aio.server()
    method = grpc.stream_stream_rpc_method_handler(
        handler, request_deserializer=bytes, response_serializer=bytes
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("f.F", {"S": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def one() -> AsyncIterator[bytes]:
        yield b"go"

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/f.F/S", request_serializer=bytes, response_deserializer=bytes
        )
        wall, cpu = time.perf_counter(), time.process_time()
        received = 0
        async for _ in call(one()):
            received += 1
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await server.stop(None)
    return (
        f"grpc.aio floor: {received} messages, {received / wall:.0f} messages/s, "
        f"{1e6 * cpu / received:.0f} us CPU per message (client and server together)"
    )


# --- engines ------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str
    out: str
    engine_args: dict[str, Any]
    prompt: str
    max_tokens: int
    duration: float
    sampling: dict[str, Any]


def engines(args: argparse.Namespace) -> dict[str, Engine]:
    echo_prompt = " ".join(f"w{i}" for i in range(args.tokens))  # > tokens tokens
    return {
        "echo": Engine(
            "echo", "echo", {"delay_ms": 0}, echo_prompt, args.tokens, args.duration, {}
        ),
        "llamacpp": Engine(
            "llamacpp", "llamacpp", {}, MODEL_PROMPT, args.max_tokens, args.model_duration,
            {"temperature": 0.0, "ignore_eos": True},
        ),
    }  # fmt: skip


def bench_engine(engine: Engine, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    http_port, grpc_port = free_port(), free_port()
    engine_json = tmp / f"{engine.name}.json"
    engine_json.write_text(json.dumps(engine.engine_args))
    argv = [PY, "-m", "dynamo_run", "in=http,grpc", f"out={engine.out}"]
    argv += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    argv += ["--extra-engine-args", str(engine_json)]
    target = Target(engine.name, argv, http_port, "/health")
    body = {"prompt": engine.prompt, "stream": True, "max_tokens": engine.max_tokens}
    body.update(engine.sampling)
    params = {"max_tokens": engine.max_tokens, "exclude_input_in_output": True, **engine.sampling}
    rows: list[dict[str, Any]] = []
    with ServerProcess(target, tmp / f"{engine.name}.log") as server:
        server.wait_ready()
        for clients in args.clients:
            best: dict[str, dict[str, float]] = {}
            for repeat in range(args.repeats):
                for proto in ("http", "grpc"):
                    print(
                        f"bench_grpc: {engine.name} {proto} x{clients} run {repeat + 1}",
                        file=sys.stderr,
                        flush=True,
                    )
                    cpu = server.cpu_seconds()
                    if proto == "http":
                        res = asyncio.run(run_http(http_port, body, clients, engine.duration))
                    else:
                        res = asyncio.run(
                            run_grpc(grpc_port, engine.prompt, params, clients, engine.duration)
                        )
                    tokens = res["tokens_per_s"] * engine.duration
                    res["server_cpu_us_per_token"] = (
                        1e6 * (server.cpu_seconds() - cpu) / max(1.0, tokens)
                    )
                    print(f"bench_grpc: {res}", file=sys.stderr, flush=True)
                    if proto not in best or res["tokens_per_s"] > best[proto]["tokens_per_s"]:
                        best[proto] = res
            for proto in ("http", "grpc"):
                rows.append({"engine": engine.name, "protocol": proto, "clients": clients,
                             **best[proto]})  # fmt: skip
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load_before: float) -> str:
    cols = ("requests", "tokens_per_request", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s")
    cols += ("server_cpu_us_per_token",)
    lines = [
        f"Streaming gRPC (ModelStreamInfer) vs HTTP SSE (/v1/completions), one "
        f"`in=http,grpc` process per engine, {time.strftime('%Y-%m-%d %H:%M')}, {CORES} CPUs, "
        f"load average before {load_before:.1f}. echo: delay 0, {args.tokens} tokens per "
        f"answer, {args.duration:.0f} s per run; llamacpp: default model, {args.max_tokens} "
        f"tokens (greedy, ignore_eos), {args.model_duration:.0f} s per run. Best of "
        f"{args.repeats} alternating runs per protocol.",
        "",
        "| engine | protocol | clients | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for row in rows:
        cells = [f"{row[c]:.0f}" if c == "requests" else f"{row[c]:.2f}" for c in cols]
        lines.append(
            f"| {row['engine']} | {row['protocol']} | {row['clients']} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    by_key = {(r["engine"], r["clients"], r["protocol"]): r for r in rows}
    for engine, clients in dict.fromkeys((r["engine"], r["clients"]) for r in rows):
        g, h = by_key[(engine, clients, "grpc")], by_key[(engine, clients, "http")]
        lines.append(
            f"- {engine}, {clients} stream(s): gRPC / HTTP tokens/s "
            f"{g['tokens_per_s'] / h['tokens_per_s']:.2f}x, TTFT p50 "
            f"{g['ttft_p50_ms'] / h['ttft_p50_ms']:.2f}x, server CPU per token "
            f"{g['server_cpu_us_per_token'] / h['server_cpu_us_per_token']:.2f}x"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="echo,llamacpp")
    parser.add_argument("--clients", default="1,4", help="concurrent streams, comma-separated")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per echo answer")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per echo run")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per model answer")
    parser.add_argument("--model-duration", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--floor", action="store_true", help="measure bare grpc.aio only")
    parser.add_argument("--out", type=Path, help="also append the markdown report here")
    args = parser.parse_args()
    if args.floor:
        emit_report(asyncio.run(grpc_floor(20000)), args.out)
        return 0
    args.clients = [int(c) for c in args.clients.split(",")]
    table = engines(args)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        for name in (n.strip() for n in args.engines.split(",") if n.strip()):
            rows += bench_engine(table[name], args, Path(tmp))
    emit_report(report(rows, args, load_before), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
