#!/usr/bin/env python
"""Distribution benchmark (issue 10): what the NATS hop between a frontend and its workers
costs, and how much one frontend carries.

Every part runs against one nats-server that this script starts on a free loopback port
(passed to every process with ``--nats-url``); every process is stopped at the end.

  hop     ``in=http out=dyn`` with one ``in=dyn://... out=llamacpp`` worker in another
          process, against ``in=http out=llamacpp`` in one process: tokens/s, TTFT p50 (1 and
          4 streams, greedy, 64 tokens, ignore_eos, the default model). Rounds interleave
          the two (order rotating each round); ratios are medians of per-round pairs.
  echo    the same comparison on ``out=echo`` (no model cost): CPU per streamed token of
          the frontend (``/proc/PID/stat``), of the worker and of nats-server.
  latency time to the first token of one-token echo answers, one request at a time: over
          HTTP (local vs remote), and in this process through a bare nats-py request, the
          request plane client and the RemoteEngine, to show where the hop's time goes.
  fanout  one frontend and 1, 2, 4, 8 ``out=mocker`` workers (a fixed ``speedup_ratio``),
          many streaming clients: requests/s and tokens/s the frontend sustains, the CPU
          of every party.

    .venv/bin/python scripts/bench_distributed.py [--parts hop,echo,latency,fanout] [--rounds 6]
        [--duration 5] [--quiet-wait S] [--clients 1,4] [--echo-clients 8]
        [--workers 1,2,4,8] [--fanout-clients 16,64] [--speedup 20] [--py-spy DIR]
        [--tree DIR] [--baseline DIR] [--out FILE.md]

``--tree DIR``: every dynamo-run process (and the latency part's in-process client) runs
DIR's ``dynamo_run``, e.g. a snapshot made with ``git archive HEAD dynamo_run | tar -x -C
DIR``, so that uncommitted work of others in this checkout stays out of the figures.
``--baseline DIR``: a second frontend, run from DIR's ``dynamo_run``, takes part in every
part, interleaved with the first, to measure a change to the frontend. ``--py-spy DIR``:
after the measured phases, one more phase each with py-spy recording the echo servers, the
echo worker and the fan-out frontends (raw stacks in DIR), summarised by where the samples
fall.

The load generator is bench_llamacpp's lean streaming client, in this process; its CPU is
measured and reported too, since it shares the cores with everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from bench_llamacpp import (
    PROMPTS,
    Connection,
    load_phase,
    machine_busy_seconds,
    pct,
    request_body,
    start_py_spy,
    stop_py_spy,
)
from bench_servers import PY, ROOT, ServerProcess, Target, emit_report, free_port

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAMESPACE = "bench"
CORES = len(os.sched_getaffinity(0))
# A round is quiet when processes other than ours used less than this many cores.
QUIET = 0.1


# --- processes ------------------------------------------------------------------------


class Cluster:
    """The processes of a run: one nats-server, then workers and HTTP servers using it."""

    def __init__(self, tmp: Path, tree: Path = ROOT) -> None:
        from dynamo_run.distributed.nats_binary import nats_server_path

        self.tmp = tmp
        self.tree = tree  # where ``python -m dynamo_run`` runs: whose dynamo_run it imports
        self.procs: list[ServerProcess] = []
        self._names: collections.Counter[str] = collections.Counter()
        port, monitor = free_port(), free_port()
        argv = [nats_server_path(), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)]
        argv += ["-js", "-sd", str(tmp / "jetstream")]
        self.nats = self.start(Target("nats", argv, monitor, "/healthz"))
        self.nats_url = f"nats://127.0.0.1:{port}"

    def _unique(self, name: str) -> str:
        self._names[name] += 1
        return name if self._names[name] == 1 else f"{name}-{self._names[name]}"

    def _engine_file(self, name: str, engine_args: dict[str, object]) -> list[str]:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(engine_args))
        return ["--extra-engine-args", str(path)]

    def http(
        self,
        name: str,
        out: str,
        engine_args: dict[str, object] | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Target:
        """``in=http out=OUT`` (``out=dyn``: a frontend on this run's NATS), run as
        ``python -m dynamo_run`` in ``cwd`` (so from that checkout)."""
        name = self._unique(name)
        port = free_port()
        argv = [PY, "-m", "dynamo_run", "in=http", "--http-port", str(port), f"out={out}"]
        if engine_args is not None:
            argv += self._engine_file(name, engine_args)
        if out.startswith("dyn"):
            argv += ["--nats-url", self.nats_url]
        return Target(name, argv, port, "/health", env=env or {}, cwd=cwd or self.tree)

    def worker(
        self, name: str, out: str, engine_args: dict[str, object], env: dict[str, str] | None = None
    ) -> Target:
        """``in=dyn://bench.backend.generate out=OUT`` on this run's NATS."""
        name = self._unique(name)
        argv = [PY, "-m", "dynamo_run", f"in=dyn://{NAMESPACE}.backend.generate", f"out={out}"]
        argv += ["--nats-url", self.nats_url, *self._engine_file(name, engine_args)]
        return Target(name, argv, 0, "", env=env or {}, ready_text=" serving ", cwd=self.tree)

    def start(self, target: Target) -> ServerProcess:
        return self.start_all([target])[0]

    def start_all(self, targets: list[Target]) -> list[ServerProcess]:
        """Start the targets together and wait until every one is ready."""
        started = [ServerProcess(t, self.tmp / f"{t.name}.log") for t in targets]
        self.procs += started
        for proc in started:
            proc.wait_ready()
        return started

    def stop(self, proc: ServerProcess) -> None:
        proc.stop()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def wait_instances(front: ServerProcess, count: int, timeout: float = 60.0) -> None:
    """Until the frontend sees exactly ``count`` live instances and serves their model."""
    base = f"http://127.0.0.1:{front.port}"
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        try:
            metrics = urllib.request.urlopen(base + "/metrics", timeout=2).read().decode()
            models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=2).read())
        except OSError:
            time.sleep(0.2)
            continue
        found = re.findall(r"^dynamo_frontend_worker_instances\{[^}]*\} (\S+)$", metrics, re.M)
        seen = int(sum(float(v) for v in found))
        if seen == count and (count == 0 or models.get("data")):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{front.name} sees {seen} instances, not {count} (log: {front.log})")


async def warm_up(port: int, load: SimpleNamespace, body: dict[str, object], n: int) -> None:
    """``n`` requests at once, so every slot and connection path has run before measuring."""
    conns = [Connection(port) for _ in range(n)]
    try:
        await asyncio.gather(
            *(
                c.stream(request_body(PROMPTS[i % len(PROMPTS)], load, body))
                for i, c in enumerate(conns)
            )
        )
    finally:
        for c in conns:
            c.close()


# --- one measured phase -----------------------------------------------------------------


def measure(
    label: str,
    front: ServerProcess,
    roles: dict[str, list[ServerProcess]],
    load: SimpleNamespace,
    clients: int,
    rnd: int,
    **extra: object,
) -> dict:
    """``clients`` closed-loop streaming clients against ``front`` for ``load.duration``
    seconds, with the CPU every role (a list of our processes), this load generator and
    everything else on the machine used meanwhile."""
    before = {role: sum(p.cpu_seconds() for p in procs) for role, procs in roles.items()}
    busy, mine, load_avg = machine_busy_seconds(), sum(os.times()[:2]), os.getloadavg()[0]
    row = asyncio.run(load_phase(front.target, load, clients, rnd))
    used = {
        role: sum(p.cpu_seconds() for p in procs) - before[role] for role, procs in roles.items()
    }
    busy = machine_busy_seconds() - busy
    mine = sum(os.times()[:2]) - mine
    elapsed, tokens = float(row["elapsed_s"]), max(1, int(row["tokens"]))
    row.pop("answers", None)
    row.update(label=label, round=rnd, load_before=load_avg, **extra)
    row["requests_per_s"] = row["completed"] / load.duration
    for role, cpu in {**used, "client": mine}.items():
        row[f"{role}_cores"] = cpu / elapsed
        row[f"{role}_us_per_token"] = 1e6 * cpu / tokens
    row["other_cores"] = max(0.0, busy - sum(used.values()) - mine) / elapsed
    print(json.dumps(row), file=sys.stderr, flush=True)
    if row["errors"]:
        print(f"bench_distributed: {label}: {row['first_error']}", file=sys.stderr)
    return row


def wait_quiet(limit_s: float, threshold: float = 0.25) -> None:
    """Wait up to ``limit_s`` seconds for half a second in which the whole machine is busy
    below ``threshold`` cores (our processes idle between phases), so that rounds start
    when other sessions pause; then go on regardless."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy, start = machine_busy_seconds(), time.monotonic()
        time.sleep(0.5)
        if (machine_busy_seconds() - busy) / (time.monotonic() - start) < threshold:
            return


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return statistics.median(values) if values else math.nan


def interleaved(
    pair: dict[str, tuple[ServerProcess, dict[str, object]]],
    roles: dict[str, list[ServerProcess]],
    load: SimpleNamespace,
    clients: list[int],
    rounds: int,
    quiet_wait: float = 0.0,
    **extra: object,
) -> list[dict]:
    """Rounds of one phase per target, the order rotating each round (local, remote;
    remote, local; ...), so a busy spell from other sessions hits both alike."""
    rows = []
    names = list(pair)
    for c in clients:
        for rnd in range(rounds):
            wait_quiet(quiet_wait)
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                front, body = pair[name]
                front.target.body = body
                rows.append(measure(name, front, roles, load, c, rnd, **extra))
    return rows


def paired(rows: list[dict], a: str, b: str, c: int) -> list[tuple[dict, dict]]:
    mine = [r for r in rows if r["clients"] == c]
    by_round: dict[int, dict[str, dict]] = collections.defaultdict(dict)
    for r in mine:
        by_round[r["round"]][r["label"]] = r
    return [(x[a], x[b]) for x in by_round.values() if a in x and b in x]


def fmt_list(values: list[float], spec: str = ".0f") -> str:
    return ", ".join(format(v, spec) for v in values)


def start_frontends(
    cluster: Cluster, args: argparse.Namespace, name: str
) -> dict[str, ServerProcess]:
    """``in=http out=dyn``: ``remote`` from this checkout, and ``remote-base`` from
    ``--baseline`` (another checkout's ``dynamo_run``), to compare two versions in one run."""
    fronts = {"remote": cluster.start(cluster.http(name, "dyn"))}
    if args.baseline:
        fronts["remote-base"] = cluster.start(
            cluster.http(f"{name}-base", "dyn", cwd=args.baseline)
        )
    return fronts


def pair_text(pairs: list[tuple[dict, dict]], what: str) -> str:
    """Paired medians of tokens/s (a / b) and TTFT p50 (a - b)."""
    if not pairs:
        return f"no {what} round"
    tps = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs if y["tokens_per_s"] > 0]
    ttft = [x["ttft_p50_ms"] - y["ttft_p50_ms"] for x, y in pairs]
    return (
        f"tokens/s paired median over {len(pairs)} {what} round(s) "
        f"**{statistics.median(tps):.3f}x** (rounds {fmt_list(tps, '.2f')}), TTFT p50 "
        f"difference **{statistics.median(ttft):+.1f} ms** (rounds {fmt_list(ttft, '+.1f')})"
    )


def cpu_ratio_text(rows: list[dict], a: str, b: str, c: int, what: str) -> str:
    """Paired median of a's serving process CPU per token over b's."""
    pairs = paired(rows, a, b, c)
    ratios = [x[f"{a}_us_per_token"] / y[f"{b}_us_per_token"] for x, y in pairs]
    if not ratios:
        return f"- {what}: no pair"
    return (
        f"- {what} (paired median of {len(ratios)} rounds): **{statistics.median(ratios):.2f}x** "
        f"(rounds {fmt_list(ratios, '.2f')})"
    )


# --- part 1: the remote hop on the real model ---------------------------------------------


def part_hop(cluster: Cluster, args: argparse.Namespace) -> list[str]:
    lines = [
        "| threads | target | clients | tokens/s median | all rounds | TTFT p50 ms (median) "
        "| ITL p50 ms | CPU ms/token: server or frontend | worker | other cores per round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for threads in args.threads:
        table, more = hop_with_threads(cluster, args, threads)
        lines += table
        notes += more
    return [*lines, "", *notes]


def hop_with_threads(
    cluster: Cluster, args: argparse.Namespace, threads: int
) -> tuple[list[str], list[str]]:
    engine = {"n_parallel": 4, "n_threads": threads}
    info = {"DYN_LOG": "info"}  # the engine logs its step counters when it closes
    local = cluster.start(cluster.http(f"local-llamacpp-t{threads}", "llamacpp", engine, env=info))
    worker = cluster.start(cluster.worker(f"worker-llamacpp-t{threads}", "llamacpp", engine, info))
    fronts = start_frontends(cluster, args, f"frontend-hop-t{threads}")
    load = SimpleNamespace(duration=args.duration, max_tokens=64)
    for front in fronts.values():
        wait_instances(front, 1)
    servers = {"local": local, **fronts}
    for server in servers.values():
        asyncio.run(warm_up(server.port, load, {}, 4))
    roles = {name: [proc] for name, proc in servers.items()}
    roles |= {"worker": [worker], "nats": [cluster.nats]}
    targets = {name: (proc, {}) for name, proc in servers.items()}
    rows = interleaved(
        targets, roles, load, args.clients, args.rounds, args.quiet_wait, threads=threads
    )
    for proc in (*fronts.values(), worker, local):
        cluster.stop(proc)

    lines = []
    for c in args.clients:
        for name in servers:
            mine = [r for r in rows if r["label"] == name and r["clients"] == c]
            worker_ms = median(mine, "worker_us_per_token") / 1000
            lines.append(
                f"| {threads} | {name} | {c} | {median(mine, 'tokens_per_s'):.1f} | "
                f"{fmt_list([r['tokens_per_s'] for r in mine])} | "
                f"{median(mine, 'ttft_p50_ms'):.1f} | {median(mine, 'itl_p50_ms'):.2f} | "
                f"{median(mine, name + '_us_per_token') / 1000:.2f} | "
                + (f"{worker_ms:.2f}" if name != "local" else "-")
                + f" | {fmt_list([r['other_cores'] for r in mine], '.2f')} |"
            )
    notes = []
    for c in args.clients:
        for name in fronts:
            pairs = paired(rows, name, "local", c)
            quiet = [(x, y) for x, y in pairs if max(x["other_cores"], y["other_cores"]) < QUIET]
            notes.append(
                f"- {threads} thread(s), {name} / local, {c} client(s): "
                + pair_text(pairs, "all")
                + "; "
                + pair_text(quiet, "quiet")
            )
        both = [r for r in rows if r["clients"] == c]
        notes.append(
            f"- {threads} thread(s), {c} client(s), cores used (medians): local server "
            f"{median([r for r in both if r['label'] == 'local'], 'local_cores'):.2f}; worker "
            f"{median([r for r in both if r['label'] == 'remote'], 'worker_cores'):.2f} + "
            f"frontend {median([r for r in both if r['label'] == 'remote'], 'remote_cores'):.2f}"
        )
    for proc in (local, worker):
        for line in proc.log.read_text(errors="replace").splitlines():
            found = re.search(r"llamacpp: (\d+ steps, .*)", line)
            if found:
                notes.append(f"- engine counters, {proc.name}: {found[1]}")
    return lines, notes


# --- part 2: per-token CPU on echo ------------------------------------------------------------


def part_echo(cluster: Cluster, args: argparse.Namespace) -> list[str]:
    engine = {"delay_ms": 0}
    local = cluster.start(cluster.http("local-echo", "echo", engine))
    worker = cluster.start(cluster.worker("worker-echo", "echo", engine))
    fronts = start_frontends(cluster, args, "frontend-echo")
    for front in fronts.values():
        wait_instances(front, 1)
    tokens, most = args.echo_tokens, max(args.echo_clients)
    load = SimpleNamespace(duration=args.duration, max_tokens=tokens)
    body = {"prompt": "a" + " a" * (tokens - 1)}
    servers = {"local": local, **fronts}
    for server in servers.values():
        asyncio.run(warm_up(server.port, load, body, most))
    roles = {name: [proc] for name, proc in servers.items()}
    roles |= {"worker": [worker], "nats": [cluster.nats]}
    targets = {name: (proc, body) for name, proc in servers.items()}
    rows = interleaved(targets, roles, load, args.echo_clients, args.rounds, args.quiet_wait)
    profile: list[str] = []
    if args.py_spy:
        for name, proc in [*servers.items(), ("remote", worker)]:
            what = "the echo worker" if proc is worker else f"{name} ({proc.name})"
            path = args.py_spy / f"echo-{proc.name}.txt"
            profile += profiled(
                f"{name}-py-spy", proc, servers[name], roles, load, most, path, what
            )
    for proc in (*fronts.values(), worker, local):
        cluster.stop(proc)

    lines = [
        "| target | clients | tokens/s median | all rounds | TTFT p50 ms | us/token: server or "
        "frontend | worker | nats-server | load generator | cores: server or frontend | worker "
        "| nats | client | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in args.echo_clients:
        for name in servers:
            mine = [r for r in rows if r["label"] == name and r["clients"] == c]
            remote = name != "local"

            def cell(
                key: str, spec: str = ".1f", mine: list[dict] = mine, on: bool = remote
            ) -> str:
                return format(median(mine, key), spec) if on else "-"

            lines.append(
                f"| {name} | {c} | {median(mine, 'tokens_per_s'):.0f} | "
                f"{fmt_list([r['tokens_per_s'] for r in mine])} | "
                f"{median(mine, 'ttft_p50_ms'):.2f} | "
                f"{median(mine, name + '_us_per_token'):.1f} | {cell('worker_us_per_token')} | "
                f"{cell('nats_us_per_token')} | {median(mine, 'client_us_per_token'):.1f} | "
                f"{median(mine, name + '_cores'):.2f} | {cell('worker_cores', '.2f')} | "
                f"{cell('nats_cores', '.2f')} | {median(mine, 'client_cores'):.2f} | "
                f"{median(mine, 'other_cores'):.2f} |"
            )
    lines.append("")
    for c in args.echo_clients:
        for name in fronts:
            what = f"{c} client(s), {name} frontend CPU per token / local server's"
            lines.append(cpu_ratio_text(rows, name, "local", c, what))
            pairs = paired(rows, name, "local", c)
            total = [
                (x[f"{name}_us_per_token"] + x["worker_us_per_token"] + x["nats_us_per_token"])
                / y["local_us_per_token"]
                for x, y in pairs
            ]
            if total:
                lines.append(
                    f"- {c} client(s), {name}: frontend + worker + nats-server CPU per token / "
                    f"local server's: **{statistics.median(total):.2f}x** "
                    f"(rounds {fmt_list(total, '.2f')})"
                )
            lines.append(f"- {c} client(s), {name} / local: " + pair_text(pairs, "all"))
        if "remote-base" in fronts:
            what = f"{c} client(s), frontend CPU per token, this checkout / baseline"
            lines.append(cpu_ratio_text(rows, "remote", "remote-base", c, what))
    return lines + profile


# --- part 2b: where the hop's latency goes ---------------------------------------------------


def part_latency(cluster: Cluster, args: argparse.Namespace) -> list[str]:
    """Time to the first token of one-token answers, one request at a time, on echo: over
    HTTP (local server vs frontend + worker), and in this process against the same worker:
    a bare nats-py request (publish Work, wait for the first Out), the request plane client,
    and the RemoteEngine the frontend uses. Rounds alternate the ways."""
    engine = {"delay_ms": 0}
    local = cluster.start(cluster.http("local-echo-latency", "echo", engine))
    worker = cluster.start(cluster.worker("worker-echo-latency", "echo", engine))
    fronts = start_frontends(cluster, args, "frontend-latency")
    for front in fronts.values():
        wait_instances(front, 1)
    try:
        samples = asyncio.run(latency_rounds(cluster.nats_url, local, fronts, args))
    finally:
        for proc in (*fronts.values(), worker, local):
            cluster.stop(proc)
    n = args.latency_requests
    lines = [
        f"{args.rounds} rounds of {n} sequential requests per way (a 100-token prompt, "
        "max_tokens 1); p50 of each round, then the median over rounds:",
        "",
        "| way | TTFT p50 ms (median of rounds) | rounds |",
        "|---|---|---|",
    ]
    for way, values in samples.items():
        lines.append(f"| {way} | {statistics.median(values):.2f} | {fmt_list(values, '.2f')} |")
    diff = [r - lo for r, lo in zip(samples["HTTP remote"], samples["HTTP local"], strict=True)]
    ours = [e - r for e, r in zip(samples["RemoteEngine"], samples["bare nats-py"], strict=True)]
    lines += [
        "",
        f"- HTTP remote - local, paired median: **{statistics.median(diff):+.2f} ms** "
        f"(rounds {fmt_list(diff, '+.2f')})",
        f"- RemoteEngine - bare nats-py round trip, paired median: "
        f"{statistics.median(ours):+.2f} ms (rounds {fmt_list(ours, '+.2f')})",
    ]
    if "HTTP remote-base" in samples:
        base = samples["HTTP remote-base"]
        diff = [r - b for r, b in zip(samples["HTTP remote"], base, strict=True)]
        lines.append(
            f"- HTTP remote - remote-base (this tree's frontend - the baseline's), paired "
            f"median: {statistics.median(diff):+.2f} ms (rounds {fmt_list(diff, '+.2f')})"
        )
    return lines


async def latency_rounds(
    url: str, local: ServerProcess, fronts: dict[str, ServerProcess], args: argparse.Namespace
) -> dict[str, list[float]]:
    from dynamo_run.distributed.frontend import RemoteModels
    from dynamo_run.distributed.nats_connect import connect_nats
    from dynamo_run.distributed.wire import End, Work, decode_to_frontend, encode
    from dynamo_run.protocol.internal import PreprocessedRequest, StopConditions

    conn = await connect_nats(url, name="bench_distributed")
    nc = conn.client
    models = RemoteModels(nc, None)
    await models.start()
    model = await models.wait_for_model(None, 30)
    assert model is not None
    subject = models.instances_of(model.card.name)[0].subject
    replies: asyncio.Queue = asyncio.Queue()

    async def on_reply(msg) -> None:  # type: ignore[no-untyped-def]
        replies.put_nowait(msg.data)

    inbox = nc.new_inbox()
    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    ids = iter(range(10**9))
    prompt = "a" + " a" * 99
    token_ids = model.preprocessor.encode(prompt)

    def request() -> PreprocessedRequest:
        return PreprocessedRequest(
            request_id=f"bench-{next(ids)}", token_ids=token_ids, stop=StopConditions(max_tokens=1)
        )

    async def bare() -> float:
        start = time.perf_counter()
        await nc.publish(subject, encode(Work(request())), reply=f"{inbox}.{next(ids)}")
        first = None
        while True:
            message = decode_to_frontend(await replies.get())
            if first is None and type(message).__name__ == "Out":
                first = time.perf_counter() - start
            if isinstance(message, End):
                return first if first is not None else math.nan

    async def through(stream) -> float:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        await stream.__anext__()
        first = time.perf_counter() - start
        async for _ in stream:
            pass
        return first

    def plane() -> object:
        return models.plane.stream(subject, "bench", Work(request()))

    load = SimpleNamespace(duration=1.0, max_tokens=1)
    body = request_body(prompt, load, {})
    conns = {"HTTP local": Connection(local.port)}
    conns |= {f"HTTP {name}": Connection(front.port) for name, front in fronts.items()}

    def over_http(way: str):  # type: ignore[no-untyped-def]
        return lambda: conns[way].stream(body)

    ways = {
        **{way: over_http(way) for way in conns},
        "bare nats-py": bare,
        "request plane client": lambda: through(plane()),
        "RemoteEngine": lambda: through(model.engine.generate(request())),
    }
    samples: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for rnd in range(args.rounds):
            # In a thread: this loop must keep up with discovery (leases) meanwhile.
            await asyncio.to_thread(wait_quiet, args.quiet_wait)
            names = list(ways)
            for way in names[rnd % len(names) :] + names[: rnd % len(names)]:
                times = []
                for _ in range(args.latency_requests):
                    got = await ways[way]()
                    times.append(got.ttft if hasattr(got, "ttft") else got)
                    await asyncio.sleep(0.002)
                samples[way].append(1000 * pct(sorted(times), 50))
    finally:
        for c in conns.values():
            c.close()
        await models.stop()
        await conn.close()
    return samples


# --- part 3: fan-out ----------------------------------------------------------------------


def part_fanout(cluster: Cluster, args: argparse.Namespace) -> list[str]:
    engine = {"speedup_ratio": args.speedup}
    fronts = start_frontends(cluster, args, "frontend-fanout")
    workers: list[ServerProcess] = []
    load = SimpleNamespace(duration=args.duration, max_tokens=args.fanout_tokens)
    # Up, then down again: each worker count is measured twice, early and late in the run.
    steps = args.workers + args.workers[-2::-1]
    rows: list[dict] = []

    def roles() -> dict[str, list[ServerProcess]]:
        mine = {name: [proc] for name, proc in fronts.items()}
        return mine | {"workers": list(workers), "nats": [cluster.nats]}

    def scale(n: int) -> None:
        if len(workers) < n:
            targets = [
                cluster.worker("worker-mocker", "mocker", engine) for _ in range(n - len(workers))
            ]
            workers.extend(cluster.start_all(targets))
        while len(workers) > n:
            cluster.stop(workers.pop())
        for front in fronts.values():
            wait_instances(front, n)

    k = 0
    for step, n in enumerate(steps):
        scale(n)
        if step == 0:
            for front in fronts.values():
                asyncio.run(warm_up(front.port, load, {}, max(args.fanout_clients)))
        for c in args.fanout_clients:
            wait_quiet(args.quiet_wait)
            names = list(fronts)
            names = names[k % len(names) :] + names[: k % len(names)]
            k += 1
            for name in names:
                rows.append(measure(name, fronts[name], roles(), load, c, step, workers_n=n))

    profile: list[str] = []
    if args.py_spy:
        n, c = max(args.workers), max(args.fanout_clients)
        scale(n)
        for name, front in fronts.items():
            what = f"{name} frontend ({front.name}) with {n} mocker workers"
            path = args.py_spy / f"fanout-{front.name}.txt"
            profile += profiled(f"{name}-py-spy", front, front, roles(), load, c, path, what)
    for proc in (*fronts.values(), *workers):
        cluster.stop(proc)

    lines = [
        "| frontend | workers | clients | requests/s | tokens/s | each phase's tokens/s "
        "| TTFT p50 ms | frontend cores | frontend us/token | workers' cores | nats cores "
        "| client cores | client us/token | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in fronts:
        for n in args.workers:
            for c in args.fanout_clients:
                mine = [
                    r
                    for r in rows
                    if r["label"] == name and r["workers_n"] == n and r["clients"] == c
                ]
                lines.append(
                    f"| {name} | {n} | {c} | {median(mine, 'requests_per_s'):.1f} | "
                    f"{median(mine, 'tokens_per_s'):.0f} | "
                    f"{fmt_list([r['tokens_per_s'] for r in mine])} | "
                    f"{median(mine, 'ttft_p50_ms'):.1f} | {median(mine, name + '_cores'):.2f} | "
                    f"{median(mine, name + '_us_per_token'):.1f} | "
                    f"{median(mine, 'workers_cores'):.2f} | {median(mine, 'nats_cores'):.2f} | "
                    f"{median(mine, 'client_cores'):.2f} | "
                    f"{median(mine, 'client_us_per_token'):.1f} | {median(mine, 'other_cores'):.2f} |"
                )
    lines.append("")
    for name in fronts:
        best = max((r for r in rows if r["label"] == name), key=lambda r: r["tokens_per_s"])
        lines.append(
            f"- {name}: most tokens/s in one phase {best['tokens_per_s']:.0f} "
            f"({best['requests_per_s']:.1f} requests/s) with {best['workers_n']} worker(s) and "
            f"{best['clients']} clients; the frontend used {best[name + '_cores']:.2f} cores at "
            f"{best[name + '_us_per_token']:.1f} us/token: one whole core would carry about "
            f"{1e6 / best[name + '_us_per_token']:.0f} tokens/s"
        )
    errors = [
        f"{r['label']}/{r['workers_n']}w/{r['clients']}c: {r['errors']}"
        for r in rows
        if r["errors"]
    ]
    lines.append("- failed requests: " + (", ".join(errors) or "none"))
    return lines + profile


# Where a frontend sample is spent: the first rule that matches a frame, walking from the
# innermost frame outwards (so a socket write under the HTTP layer counts as the write, and
# a Task created by asyncio.wait_for counts as wait_for). Rules: (category, path or
# function substrings).
PROFILE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("asyncio.wait_for per message (a Task and a timer each)", ("wait_for (asyncio/tasks.py",)),
    ("socket write (one send per SSE chunk)", ("_SelectorSocketTransport.write ",)),
    ("NATS client (read, parse, Msg, subscription queue, callback)", ("nats/", "_on_reply")),
    ("msgpack decode of worker messages", ("distributed/wire.py",)),
    (
        "request plane + remote engine (our per-token code)",
        (
            "request_plane.py",
            "remote_engine.py",
            "distributed/router.py",
            "distributed/frontend.py",
        ),
    ),
    ("detokeniser + stop strings", ("pipeline/postprocess.py",)),
    ("ModelClient.stream", ("pipeline/client.py",)),
    (
        "SSE chunk rendering",
        ("http/render.py", "pipeline/choices.py", "http/generate.py", "pipeline/responses.py"),
    ),
    ("metrics", ("dynamo_run/metrics.py", "prometheus_client/")),
    (
        "HTTP layer (uvicorn h11, starlette, middleware)",
        ("h11/", "uvicorn/", "starlette/", "anyio/", "http/middleware.py", "http/app.py"),
    ),
    ("echo engine (local)", ("dynamo_run/echo.py",)),
]
OTHER = "event loop: scheduling, Task steps, select (nothing more specific on the stack)"


def summarise_profile(path: Path, what: str) -> list[str]:
    """Shares of a process's busy samples (py-spy raw: one collapsed stack per line, idle
    samples left out), by category and by function."""
    if not path.exists():
        return ["", f"(no profile: {path} was not written)"]
    categories: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")[1:]  # [0] is the thread
        if frames:
            own[_frame(frames[-1])] += n
        categories[_category(frames)] += n
    if not total:
        return ["", f"(empty profile: {path})"]
    lines = [
        "",
        f"py-spy, {what}: {total} busy samples at 200 Hz ({path.name}).",
        "",
        "| share | where (innermost matching frame) |",
        "|---|---|",
    ]
    lines += [f"| {100 * n / total:.1f}% | {cat} |" for cat, n in categories.most_common()]
    lines += [
        "",
        "Top functions by own time: "
        + ", ".join(f"`{f}` {100 * n / total:.1f}%" for f, n in own.most_common(12)),
    ]
    return lines


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for category, needles in PROFILE_RULES:
            if any(needle in frame for needle in needles):
                return category
    return OTHER


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    return f"{name} ({Path(where).name})" if where else name


def profiled(
    label: str,
    proc: ServerProcess,
    front: ServerProcess,
    roles: dict[str, list[ServerProcess]],
    load: SimpleNamespace,
    clients: int,
    path: Path,
    what: str,
) -> list[str]:
    """One extra phase with py-spy recording ``proc`` (not part of the measured rounds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    spy = start_py_spy(proc.proc.pid, SimpleNamespace(py_spy=path, py_spy_native=False))
    try:
        row = measure(label, front, roles, load, clients, 0)
    finally:
        stop_py_spy(spy)
    return summarise_profile(
        path, f"{what}, {clients} clients, {row['tokens_per_s']:.0f} tokens/s meanwhile"
    )


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="hop,echo,latency,fanout")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds, hop and echo")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each round, wait up to S seconds for other sessions' load to pause",
    )
    parser.add_argument("--clients", default="1,4", help="hop: concurrent streams")
    parser.add_argument(
        "--threads", default="2", help="hop: llama.cpp threads (a list runs the hop for each)"
    )
    parser.add_argument("--echo-clients", default="8")
    parser.add_argument("--latency-requests", type=int, default=100, help="per way and round")
    parser.add_argument("--echo-tokens", type=int, default=100)
    parser.add_argument("--workers", default="1,2,4,8", help="fanout: mocker workers")
    parser.add_argument("--fanout-clients", default="16,64")
    parser.add_argument("--fanout-tokens", type=int, default=64)
    parser.add_argument("--speedup", type=float, default=20.0, help="mocker speedup_ratio")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="after the measured phases, profile the echo and fan-out servers (raw files here)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run a frontend from DIR/dynamo_run (e.g. `git archive HEAD dynamo_run`), "
        "interleaved with this checkout's, to measure a change",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="run every dynamo-run process (and the in-process latency part) from DIR's "
        "dynamo_run instead of this checkout's",
    )
    parser.add_argument("--out", type=Path, help="append the markdown report here")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.threads = [int(c) for c in args.threads.split(",")]
    args.echo_clients = [int(c) for c in args.echo_clients.split(",")]
    args.workers = [int(c) for c in args.workers.split(",")]
    args.fanout_clients = [int(c) for c in args.fanout_clients.split(",")]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.tree = args.tree.resolve()
    sys.path.insert(0, str(args.tree))  # before anything imports dynamo_run

    load0, t0, started = os.getloadavg(), time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        cluster = Cluster(Path(tmp), args.tree)
        try:
            if "hop" in parts:
                report += [
                    "#### The remote hop, default model (llama.cpp, 4 slots)",
                    "",
                    *part_hop(cluster, args),
                    "",
                ]
            if "echo" in parts:
                report += [
                    f"#### CPU per streamed token on echo (delay 0, {args.echo_tokens} tokens "
                    "per answer)",
                    "",
                    *part_echo(cluster, args),
                    "",
                ]
            if "latency" in parts:
                report += [
                    "#### Where the hop's latency goes (echo, one request at a time)",
                    "",
                    *part_latency(cluster, args),
                    "",
                ]
            if "fanout" in parts:
                lines = part_fanout(cluster, args)
                report += [
                    f"#### Fan-out: one frontend, mocker workers (speedup_ratio {args.speedup:g}, "
                    f"{args.fanout_tokens} tokens per answer)",
                    "",
                    *lines,
                    "",
                ]
        finally:
            cluster.stop_all()
    wall = time.perf_counter() - t0
    head = [
        f"### bench_distributed {started}-{time.strftime('%H:%M')}",
        "",
        f"`{' '.join(['scripts/bench_distributed.py', *sys.argv[1:]])}`: {CORES} CPUs, load "
        f"average {load0[0]:.1f} at start, {wall:.0f} s in all; {args.duration:g} s per phase; "
        "one nats-server on loopback.",
        "",
    ]
    emit_report("\n".join(head + report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
