"""Workers and frontends in separate processes over a real nats-server on loopback.

Each test uses its own namespace so that instances of another test (whose records linger
for a lease) never answer for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time

import httpx
import nats as nats_py
import openai
import pytest
from conftest import run_cli
from dist_helpers import NatsServer, Worker, frontend, start_nats, start_procs, wait_models
from http_helpers import MODEL_NAME, free_port, metric, parse_metrics

from dynamo_run.distributed.discovery import (
    CLOCK_SKEW_S,
    InstanceWatcher,
    instances_bucket,
)
from dynamo_run.distributed.kv_events import KvEventPublisher
from dynamo_run.distributed.request_plane import RequestPlaneClient, WorkerLost
from dynamo_run.distributed.wire import InstanceRecord, Work, encode_record, instance_subject
from dynamo_run.protocol.internal import KvCacheEvent, PreprocessedRequest, StopConditions
from dynamo_run.ps import live_instances

LONG_PROMPT = " ".join(f"word{i}" for i in range(120))


@pytest.fixture(scope="module")
def nats():
    yield from start_nats()


@pytest.fixture()
def procs():
    yield from start_procs()


def start_workers(procs, nats_url: str, count: int, **kwargs) -> list[Worker]:
    workers = [Worker(nats_url, **kwargs) for _ in range(count)]
    procs.extend(workers)
    return [w.wait_ready() for w in workers]


def start_frontend(procs, nats_url: str, endpoint: str, args: list[str] | None = None, env=None):
    server = frontend(nats_url, out=endpoint, args=args, env=env)
    procs.append(server)
    server.wait_ready()
    return server


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, text: str = "Hello there", **kw) -> str:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": text}], **kw
    )
    return reply.choices[0].message.content or ""


def per_instance(server, name: str) -> dict[str, float]:
    values = server.metrics()
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith(name + "{") and 'instance="' in key:
            instance = key.split('instance="', 1)[1].split('"', 1)[0]
            out[instance] = out.get(instance, 0) + value
    return out


def test_round_robin_spreads_and_models_follow_workers(nats, procs):
    endpoint = "dyn://rr.backend.generate"
    workers = start_workers(procs, nats.url, 2, endpoint=endpoint, engine_args={"delay_ms": 0})
    fe = start_frontend(procs, nats.url, endpoint, ["--router-mode", "round-robin"])
    wait_models(fe, [MODEL_NAME])
    client = openai_client(fe)
    for _ in range(6):
        assert "Hello there" in ask(client)
    counts = per_instance(fe, "dynamo_frontend_worker_requests_total")
    assert counts == {workers[0].instance_id: 3.0, workers[1].instance_id: 3.0}, counts
    values = fe.metrics()
    assert metric(values, "dynamo_frontend_worker_instances", model=MODEL_NAME) == 2
    # The model card travelled with the instance: templating and defaults are the model's.
    info = client.models.retrieve(MODEL_NAME)
    assert info.model_extra["generation_defaults"]["top_k"]["value"] == 40
    # A clean stop leaves discovery at once; the last one takes the model away.
    assert workers[0].stop() == 0
    assert workers[1].stop() == 0
    wait_models(fe, [], timeout=5)


def test_random_mode_uses_every_worker(nats, procs):
    endpoint = "dyn://rnd.backend.generate"
    workers = start_workers(procs, nats.url, 2, endpoint=endpoint, engine_args={"delay_ms": 0})
    fe = start_frontend(procs, nats.url, endpoint, ["--router-mode", "random"])
    wait_models(fe, [MODEL_NAME])
    client = openai_client(fe)
    for _ in range(16):
        ask(client, max_tokens=4)
    counts = per_instance(fe, "dynamo_frontend_worker_requests_total")
    assert set(counts) == {w.instance_id for w in workers}
    assert sum(counts.values()) == 16


def ps_json(nats_url: str, namespace: str) -> list[dict]:
    result = run_cli("ps", "--json", "--nats-url", nats_url, "--namespace", namespace, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cancel_across_the_hop_frees_the_worker(nats, procs):
    endpoint = "dyn://cancel.backend.generate"
    (worker,) = start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 40})
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    with httpx.Client(timeout=30) as http:
        body = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "stream": True}
        with http.stream("POST", fe.url + "/completions", json=body) as res:
            lines = res.iter_lines()
            got = [line for _, line in zip(range(4), lines, strict=False)]
            assert any(line.startswith("data:") for line in got)
            # The worker's record shows the request within a lease refresh (every 2/3 s).
            deadline = time.monotonic() + 10
            while True:
                records = ps_json(nats.url, "cancel")
                if records and records[0]["load"].get("in_flight") == 1:
                    break
                assert time.monotonic() < deadline, records
                time.sleep(0.2)
    # The client hung up: the frontend cancels, the worker frees the request.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = ps_json(nats.url, "cancel")
        if records and records[0]["load"].get("in_flight", 0) == 0:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"worker still busy: {records}\n{worker.log()}")
    assert records[0]["instance_id"] == worker.instance_id
    assert records[0]["engine"] == "echo"


def test_sigkill_worker_leaves_within_its_lease(nats, procs):
    endpoint = "dyn://lease.backend.generate"
    (worker,) = start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 0})
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    worker.stop(signal.SIGKILL)
    start = time.monotonic()
    wait_models(fe, [], timeout=10)
    assert time.monotonic() - start < 5  # lease 2 s in these tests
    res = httpx.post(
        fe.url + "/chat/completions",
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert res.status_code == 503
    error = res.json()["error"]
    assert error["code"] == "no_instances"
    assert MODEL_NAME in error["message"] and "lease.backend.generate" in error["message"]


def test_a_name_never_served_is_a_404_and_a_model_whose_workers_left_a_503(nats, procs):
    """The openai client (default retries) gets NotFoundError at once for a name no worker
    ever served, as from a local server, rather than retrying a 503; a model that was served
    and whose workers all left stays a 503 (one may come back)."""
    endpoint = "dyn://unknown.backend.generate"
    (worker,) = start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 0})
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    retrying = openai.OpenAI(base_url=fe.url, api_key="unused", timeout=30)  # max_retries 2
    messages = [{"role": "user", "content": "hi"}]
    start = time.monotonic()
    with pytest.raises(openai.NotFoundError) as info:
        retrying.chat.completions.create(model="no-such-model", messages=messages)
    assert time.monotonic() - start < 2  # a retried 503 waits ~1 s (Retry-After) twice
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "`no-such-model` does not exist" in error["message"] and MODEL_NAME in error["message"]
    values = fe.metrics()
    assert metric(values, "dynamo_frontend_requests_total", status="404") == 1  # not retried
    assert metric(values, "dynamo_frontend_requests_total", status="503") == 0
    assert worker.stop() == 0
    wait_models(fe, [], timeout=10)
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(fe).chat.completions.create(model=MODEL_NAME, messages=messages)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "no_instances"
    with pytest.raises(openai.NotFoundError):  # still never served
        openai_client(fe).chat.completions.create(model="no-such-model", messages=messages)


def test_sigterm_deregisters_first_and_finishes_in_flight(nats, procs):
    endpoint = "dyn://term.backend.generate"
    (worker,) = start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 20})
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    client = openai_client(fe)
    result: dict = {}

    def long_request() -> None:
        reply = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=100)
        result["reply"] = reply

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.6)  # the request is being served
    worker.proc.send_signal(signal.SIGTERM)
    wait_models(fe, [], timeout=1.5)  # deregistered at once, not after the lease
    thread.join(30)
    assert result["reply"].choices[0].finish_reason == "length"
    assert result["reply"].usage.completion_tokens == 100
    assert worker.stop() == 0


def test_a_draining_worker_refuses_new_work_as_retryable_at_once(nats, procs):
    """A request that reaches a worker after it left discovery (a frontend's view lags) is
    refused with a retryable Fail at once, which the request plane turns into WorkerLost
    (the frontend's cue to try or migrate elsewhere), not left to the ack timeout."""
    endpoint = "dyn://refuse.backend.generate"
    (worker,) = start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 20})
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    client = openai_client(fe)
    result: dict = {}

    def long_request() -> None:
        result["reply"] = client.completions.create(
            model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=100
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.6)  # the request is being served
    worker.proc.send_signal(signal.SIGTERM)
    wait_models(fe, [], timeout=1.5)  # left discovery; still draining the long request

    async def late_request() -> tuple[str, float]:
        nc = await nats_py.connect(nats.url)
        try:
            plane = RequestPlaneClient(nc, ack_timeout=5.0, silence_timeout=5.0)
            await plane.start()
            request = PreprocessedRequest("late-1", [1, 2, 3], stop=StopConditions(max_tokens=4))
            work = Work(request)
            subject = instance_subject("refuse", "backend", "generate", worker.instance_id)
            started = time.monotonic()
            try:
                async for _ in plane.stream(subject, worker.instance_id, work):
                    pass
            except WorkerLost as exc:
                return str(exc), time.monotonic() - started
            return "answered", time.monotonic() - started
        finally:
            await nc.close()

    message, took = asyncio.run(late_request())
    assert "shutting down" in message and took < 1.0, (message, took)
    thread.join(30)
    assert result["reply"].usage.completion_tokens == 100  # the in-flight one still finished
    assert worker.stop() == 0


def test_ps_and_frontends_judge_liveness_alike(nats):
    """Records already in the bucket: `dynamo-run ps` and a frontend that starts watching
    count the same ones live (one rule); a put seen live counts however skewed the worker's
    clock, since the frontend times it on its own."""

    def rec(instance_id: str, age_s: float) -> InstanceRecord:
        now = time.time()
        return InstanceRecord(
            instance_id=instance_id, namespace="alike", component="c", endpoint="e",
            subject=f"dyn.alike.c.e.{instance_id}", model="m", engine="echo", host="h",
            pid=1, card_digest="d", started_at=now - 60, updated_at=now - age_s, lease_s=3.0,
        )  # fmt: skip

    async def main() -> tuple[set[str], set[str], set[str]]:
        nc = await nats_py.connect(nats.url)
        try:
            bucket = await instances_bucket(nc.jetstream())
            for record in (rec("fresh", 0.5), rec("recent", 2 + CLOCK_SKEW_S), rec("old", 20)):
                await bucket.put(record.key, encode_record(record))
            in_ps = {r.instance_id for r in await live_instances(nc, "alike")}
            watcher = InstanceWatcher(nc, prefix="alike.c.e")
            await watcher.start()
            assert await watcher.wait_synced()
            at_start = {r.instance_id for r in watcher.instances.values()}
            skewed = rec("skewed", 60)  # its host's clock is a minute behind
            await bucket.put(skewed.key, encode_record(skewed))
            await asyncio.sleep(0.5)
            later = {r.instance_id for r in watcher.instances.values()}
            await watcher.stop()
            for key in await bucket.keys():
                if key.startswith("alike."):
                    await bucket.delete(key)
            return in_ps, at_start, later
        finally:
            await nc.close()

    in_ps, at_start, later = asyncio.run(main())
    assert in_ps == at_start == {"fresh", "recent"}
    assert later == {"fresh", "recent", "skewed"}


def test_a_worker_warns_and_counts_when_nats_goes_away(procs):
    """A worker whose NATS server dies cannot renew its lease: it says so on stderr at once
    (not only at debug), counts the failures on its /metrics, and says when it works again."""
    server = NatsServer()
    try:
        port = free_port()
        worker = Worker(server.url, endpoint="dyn://away.backend.generate",
                        env={"DYN_SYSTEM_PORT": str(port), "DYN_SYSTEM_HOST": "127.0.0.1"})  # fmt: skip
        procs.append(worker)
        worker.wait_ready()
        url = f"http://127.0.0.1:{port}/metrics"

        def failures() -> float:
            return metric(parse_metrics(httpx.get(url, timeout=5).text),
                          "dynamo_component_lease_renew_failures_total")  # fmt: skip

        assert failures() == 0
        server.stop()
        worker.wait_for(r"WARNING .*discovery lease renewal of instance \w+ failed: ", 20)
        assert failures() >= 1
        server.start()
        worker.wait_for(r"discovery lease renewal of instance \w+ works again after", 20)
        assert worker.stop() == 0
    finally:
        server.cleanup()


def test_kv_events_that_cannot_be_published_are_warned_about_and_counted(nats, caplog):
    """On a connection that is gone, each event fails: the first is a warning, all count."""

    async def main() -> int:
        nc = await nats_py.connect(nats.url)
        await nc.close()
        publisher = KvEventPublisher(nc, "dyn.kv.gone.c.e.abc")
        for n in range(3):
            publisher(KvCacheEvent("stored", [n]))
        await publisher.close()
        return publisher.failures.total

    caplog.set_level(logging.WARNING, logger="dynamo_run.kv_events")
    assert asyncio.run(main()) == 3
    warned = [r.getMessage() for r in caplog.records if r.name == "dynamo_run.kv_events"]
    assert warned == [
        "KV event publishing on dyn.kv.gone.c.e.abc failed: ConnectionClosedError: nats: connection closed"
    ]


def test_nats_restart_under_way(procs):
    server = NatsServer()
    try:
        endpoint = "dyn://restart.backend.generate"
        start_workers(procs, server.url, 1, endpoint=endpoint, engine_args={"delay_ms": 0})
        fe = start_frontend(procs, server.url, endpoint)
        wait_models(fe, [MODEL_NAME])
        client = openai_client(fe)
        assert "Hello" in ask(client)
        server.stop()
        time.sleep(1.0)
        server.start()  # same port, JetStream's memory buckets are gone
        deadline = time.monotonic() + 20
        while True:
            try:
                assert "Hello" in ask(client)
                break
            except (openai.APIStatusError, openai.APIConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        server.cleanup()


def test_text_and_batch_inputs_over_dyn(nats, procs, tmp_path):
    endpoint = "dyn://cli.backend.generate"
    (worker,) = start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 0})
    shot = run_cli(f"out={endpoint}", "--nats-url", nats.url, "-p", "Echo me please")
    assert shot.returncode == 0, shot.stderr
    assert "Echo me please" in shot.stdout
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"text": "first line"}\n{"text": "second line"}\nnot json\n')
    out = tmp_path / "out.jsonl"
    result = run_cli(
        f"in=batch:{batch}", f"out={endpoint}", "--nats-url", nats.url, "--output", str(out)
    )
    assert result.returncode == 1, result.stderr  # one bad line
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "first line" in lines[0]["text"] and "second line" in lines[1]["text"]
    assert lines[0]["instance_id"] == lines[1]["instance_id"] == worker.instance_id
    assert lines[2]["error"]


def test_no_worker_is_a_clear_error_not_a_hang(nats):
    result = run_cli(
        "out=dyn://nobody.backend.generate", "--nats-url", nats.url, "-p", "hi",
        env={"DYN_WAIT_FOR_WORKER_S": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "no worker serves" in result.stderr and "nobody.backend.generate" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.model
def test_llamacpp_worker_answers_like_local(nats, procs, tmp_path):
    endpoint = "dyn://llama.backend.generate"
    start_workers(procs, nats.url, 1, endpoint=endpoint, out="llamacpp")
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    question = "Name the capital of France."
    remote = ask(openai_client(fe), question, temperature=0, max_tokens=24)
    template = tmp_path / "greedy.json"
    template.write_text(json.dumps({"temperature": 0, "max_tokens": 24}))
    local = run_cli("out=llamacpp", "--request-template", str(template), "-p", question)
    assert local.returncode == 0, local.stderr
    assert "Paris" in remote
    assert remote.strip() == local.stdout.strip()


MOCKER_ARGS = {"decode_ms_base": 25.0, "decode_ms_per_seq": 0.0, "prefill_ms_per_token": 0.0}


def stream_and_kill(fe, workers, after: int, prompt: str, max_tokens: int) -> list[str]:
    """Stream a completion; after ``after`` chunks SIGKILL the worker serving it."""
    client = openai_client(fe)
    pieces: list[str] = []
    stream = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if len(pieces) == after:
            busy = per_instance(fe, "dynamo_frontend_worker_inflight_requests")
            (victim,) = [w for w in workers if busy.get(w.instance_id) == 1]
            victim.stop(signal.SIGKILL)
    return pieces


def test_migration_continues_the_stream_exactly(nats, procs):
    endpoint = "dyn://mig.backend.generate"
    workers = start_workers(
        procs, nats.url, 2, out="mocker", endpoint=endpoint, engine_args=MOCKER_ARGS
    )
    fe = start_frontend(procs, nats.url, endpoint, ["--migration-limit", "1"])
    wait_models(fe, [MODEL_NAME])
    prompt = "Tell me a long story about a lighthouse."
    reference = openai_client(fe).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=80)
    pieces = stream_and_kill(fe, workers, after=10, prompt=prompt, max_tokens=80)
    # One unbroken stream: every token once, in order, as the uninterrupted answer.
    assert "".join(pieces) == reference.choices[0].text
    assert metric(fe.metrics(), "dynamo_frontend_worker_migrations_total") == 1


def test_without_migration_a_dead_worker_ends_the_stream_with_an_error(nats, procs):
    endpoint = "dyn://nomig.backend.generate"
    workers = start_workers(
        procs, nats.url, 2, out="mocker", endpoint=endpoint, engine_args=MOCKER_ARGS
    )
    fe = start_frontend(procs, nats.url, endpoint)  # --migration-limit 0
    wait_models(fe, [MODEL_NAME])
    with pytest.raises(openai.APIError) as err:
        stream_and_kill(fe, workers, after=5, prompt="Another story, please.", max_tokens=200)
    assert "instance" in str(err.value)
    # The frontend still serves new requests from the surviving worker.
    assert ask(openai_client(fe), max_tokens=5)


def test_heartbeats_keep_a_long_prefill_alive(nats, procs):
    """A prefill longer than the frontend's silence timeout (5 s) is not mistaken for a dead
    worker: the worker sends heartbeats while nothing else flows."""
    endpoint = "dyn://hb.backend.generate"
    args = {"prefill_ms_per_token": 12.0, "decode_ms_base": 1.0, "decode_ms_per_seq": 0.0}
    start_workers(procs, nats.url, 1, out="mocker", endpoint=endpoint, engine_args=args)
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    prompt = " ".join(f"w{i}" for i in range(300))  # ~600 tokens: ~7 s of prefill
    started = time.monotonic()
    reply = openai_client(fe).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4)
    assert time.monotonic() - started > 5.5  # longer than the silence timeout
    assert reply.choices[0].finish_reason == "length"
    assert metric(fe.metrics(), "dynamo_frontend_worker_errors_total") == 0


def test_sse_keepalives_while_a_remote_first_token_is_slow(nats, procs):
    """Over the hop the stream waits for its first token to name the worker; one slower than
    the keep-alive interval starts at once with `: ping` comments instead."""
    endpoint = "dyn://ping.backend.generate"
    start_workers(procs, nats.url, 1, endpoint=endpoint, engine_args={"delay_ms": 900})
    fe = start_frontend(procs, nats.url, endpoint, env={"DYN_HTTP_SSE_KEEPALIVE_S": "0.2"})
    wait_models(fe, [MODEL_NAME])
    body = {"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", fe.url + "/completions", json=body, timeout=30) as res:
        lines = [line for line in res.iter_lines() if line]
    assert lines[0] == ": ping" and lines[-1] == "data: [DONE]", lines
    texts = [json.loads(x[6:])["choices"][0]["text"] for x in lines if x.startswith("data: {")]
    assert len(texts) == 2 and all(texts)


def test_worker_kv_events_replay_from_the_stream(nats, procs, default_card):
    """A mocker worker publishes what its KV cache stores; a subscriber that starts later
    replays it from the JetStream stream: the prompt's full blocks, chained as kv_blocks."""
    import asyncio

    from dynamo_run.distributed.kv_events import KvEventSubscriber
    from dynamo_run.kv_blocks import block_hashes
    from dynamo_run.pipeline.preprocess import Preprocessor
    from dynamo_run.protocol.openai import CompletionRequest

    endpoint = "dyn://kvev.backend.generate"
    (worker,) = start_workers(
        procs, nats.url, 1, out="mocker", endpoint=endpoint, engine_args=MOCKER_ARGS
    )
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    prompt = " ".join(f"item{i}" for i in range(60))
    openai_client(fe).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    prompt_ids = Preprocessor(default_card).completion(CompletionRequest(prompt=prompt))[0]
    expected = block_hashes(prompt_ids.engine_request.token_ids, 16)
    assert len(expected) >= 4

    async def replay() -> tuple[set[int], set[str]]:
        import nats as nats_py

        nc = await nats_py.connect(nats.url)
        stored: set[int] = set()
        instances: set[str] = set()

        def on_event(instance_id, event):
            instances.add(instance_id)
            if event.kind == "stored":
                stored.update(event.block_hashes)

        subscriber = KvEventSubscriber(nc, "kvev.backend.generate", on_event)
        await subscriber.start()
        for _ in range(50):
            if set(expected) <= stored:
                break
            await asyncio.sleep(0.1)
        await subscriber.stop()
        await nc.close()
        return stored, instances

    stored, instances = asyncio.run(replay())
    assert instances == {worker.instance_id}
    assert set(expected) <= stored


def test_responses_name_the_worker_that_served_them(nats, procs):
    endpoint = "dyn://hdr.backend.generate"
    workers = start_workers(procs, nats.url, 2, endpoint=endpoint, engine_args={"delay_ms": 0})
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    ids = {w.instance_id for w in workers}
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
    seen = set()
    with httpx.Client(timeout=30) as http:
        for _ in range(2):
            res = http.post(fe.url + "/chat/completions", json=body)
            assert res.status_code == 200
            seen.add(res.headers["x-dynamo-worker"])
        with http.stream(
            "POST", fe.url + "/chat/completions", json={**body, "stream": True}
        ) as res:
            assert res.headers["x-dynamo-worker"] in ids
            events = [line for line in res.iter_lines() if line.startswith("data:")]
    assert seen == ids  # round-robin: one each
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: ") :])
    assert first["choices"][0]["delta"]["role"] == "assistant"
