"""``in=dyn://namespace.component.endpoint``: serve the engine as a distributed worker.

Starts the engine, connects to NATS (the embedded server shared per host, or --nats-url),
puts the model card in the card store and the instance in discovery under a lease, and
serves token-level requests on the instance's subject. SIGTERM/SIGINT: leave discovery
first, let in-flight requests finish (bounded), then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid

from dynamo_run.distributed.discovery import DEFAULT_LEASE_S, Registration
from dynamo_run.distributed.kv_events import KvEventPublisher, ensure_kv_stream, kv_subject
from dynamo_run.distributed.request_plane import EndpointServer
from dynamo_run.distributed.wire import InstanceRecord, instance_subject
from dynamo_run.distributed.worker_metrics import WorkerCounters, serve_metrics
from dynamo_run.errors import RunError
from dynamo_run.model.card_wire import card_digest, card_to_bytes
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.protocol.internal import EngineLoad
from dynamo_run.spec import RunSpec

log = logging.getLogger("dynamo_run.worker")

DRAIN_TIMEOUT_S = float(os.environ.get("DYN_WORKER_DRAIN_S", "30"))
LEASE_S = float(os.environ.get("DYN_LEASE_S", str(DEFAULT_LEASE_S)))
# Dynamo's system status server: a worker's /metrics, off unless a port is given.
SYSTEM_HOST = os.environ.get("DYN_SYSTEM_HOST", "0.0.0.0")


def _system_port() -> int:
    """DYN_SYSTEM_PORT as a port number; -1 (or unset) for no metrics server."""
    text = os.environ.get("DYN_SYSTEM_PORT", "").strip() or "-1"
    port = int(text) if text.lstrip("-").isdigit() else 65536
    if port > 65535:
        raise ValueError(f"DYN_SYSTEM_PORT must be a port number (or -1 for none), not {text!r}")
    return port


def _engine_load(client: ModelClient, server: EndpointServer) -> EngineLoad:
    load = client.engine.load()
    # Frontends size their per-worker limit from the slots.
    slots = load.slots_total or client.engine.capabilities().max_concurrency or 0
    return EngineLoad(
        in_flight=server.in_flight,
        slots_total=slots,
        slots_busy=load.slots_busy,
        kv_blocks_total=load.kv_blocks_total,
        kv_blocks_used=load.kv_blocks_used,
    )


async def run_worker(loading: asyncio.Task[ModelClient], spec: RunSpec) -> int:
    from dynamo_run.distributed.nats_connect import NatsError, connect_nats

    endpoint = spec.input.endpoint
    assert endpoint is not None
    client = await loading
    try:
        system_port = _system_port()
    except ValueError as exc:
        raise RunError(f"in=dyn: {exc}") from None
    try:
        conn = await connect_nats(
            spec.flags.nats_url,
            token=spec.flags.nats_token,
            listen=spec.flags.nats_listen,
            name=f"dynamo-run worker {endpoint.url}",
        )
    except NatsError as exc:  # the user's to fix (URL, token): one line, not "internal error"
        raise RunError(f"in=dyn: {exc}") from None
    nc = conn.client
    instance_id = uuid.uuid4().hex[:16]
    subject = instance_subject(endpoint.namespace, endpoint.component, endpoint.name, instance_id)
    server = EndpointServer(nc, subject, client.engine, instance_id)
    can = client.engine.capabilities()
    card_bytes = card_to_bytes(client.card)
    now = time.time()
    record = InstanceRecord(
        instance_id=instance_id,
        namespace=endpoint.namespace,
        component=endpoint.component,
        endpoint=endpoint.name,
        subject=subject,
        model=client.card.name,
        engine=client.engine_name or type(client.engine).__name__,
        host=socket.gethostname(),
        pid=os.getpid(),
        card_digest=card_digest(card_bytes),
        started_at=now,
        updated_at=now,
        lease_s=LEASE_S,
        supports_json_object=can.json_object,
        supports_json_schema=can.json_schema,
    )

    def refresh(rec: InstanceRecord) -> None:
        rec.load = _engine_load(client, server)

    registration = Registration(nc, record, card_bytes, refresh)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    publisher: KvEventPublisher | None = None
    metrics_server = None
    try:
        if can.kv_events:  # the engine reports its KV cache: routers can use it
            await ensure_kv_stream(nc)
            publisher = KvEventPublisher(
                nc, kv_subject(endpoint.namespace, endpoint.component, endpoint.name, instance_id)
            )
            client.engine.set_kv_event_sink(publisher)
        else:
            log.info("the engine reports no KV events: KV-aware routers see none of its cache")
        await server.start()
        if system_port >= 0:
            counters = WorkerCounters(
                instance_id,
                served=lambda: server.served,
                in_flight=lambda: server.in_flight,
                lease_failures=registration.renew_failures,
                kv_failures=lambda: publisher.failures if publisher is not None else None,
            )
            try:
                metrics_server = serve_metrics(SYSTEM_HOST, system_port, counters)
            except OSError as exc:
                raise RunError(
                    f"in=dyn: cannot serve metrics on {SYSTEM_HOST}:{system_port}: {exc}"
                ) from None
            port = metrics_server.server_address[1]
            print(
                f"dynamo-run: worker metrics at http://{SYSTEM_HOST}:{port}/metrics",
                file=sys.stderr,
                flush=True,
            )
        await registration.start()
        print(
            f"dynamo-run: worker {instance_id} serving {client.card.name} at {endpoint.url} "
            f"(NATS {conn.url})",
            file=sys.stderr,
            flush=True,
        )
        if conn.share_url:
            print(
                f"dynamo-run: other hosts join with --nats-url {conn.share_url}",
                file=sys.stderr,
                flush=True,
            )
        await stop.wait()
        log.info("stopping: leaving discovery, then finishing %d requests", server.in_flight)
        await registration.withdraw()
        cancelled = await server.drain(DRAIN_TIMEOUT_S)
        if cancelled:
            print(
                f"dynamo-run: worker stopped; {cancelled} requests did not finish in "
                f"{DRAIN_TIMEOUT_S:g} s",
                file=sys.stderr,
            )
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            if stop.is_set():
                # Stopping on a signal: a repeated one (as during the drain) must not kill
                # the rest of the exit, which then would not be 0.
                signal.signal(sig, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            await registration.withdraw()
        if publisher is not None:
            client.engine.set_kv_event_sink(None)
            await publisher.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        await conn.close()
