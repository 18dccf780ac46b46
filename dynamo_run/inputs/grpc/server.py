"""``in=grpc`` (and ``in=http,grpc``): serve the KServe v2 gRPC protocol with grpcio's asyncio
server inside the runner's event loop.

Like ``in=http`` the server listens at once (UNAVAILABLE while the model loads), stops with
the one-line reason if loading fails, and on SIGINT/SIGTERM stops accepting calls, lets the
ones in flight end (up to a grace period) and returns 0. ``in=http,grpc`` runs both servers
over one pipeline and one metrics registry, whose /metrics is on the HTTP port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import Any

import grpc

from dynamo_run.inputs.grpc.service import InferenceService
from dynamo_run.inputs.http.server import run_http
from dynamo_run.pipeline.admission import AdmissionSettings
from dynamo_run.pipeline.serving import ServedModels, describe, load_failed
from dynamo_run.spec import RunSpec

log = logging.getLogger("dynamo_run.grpc")

GRACEFUL_SHUTDOWN_S = 10.0
MAX_MESSAGE_BYTES = 32 << 20  # the HTTP server's body limit

_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server on it
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class GrpcStartError(RuntimeError):
    """The server cannot listen (port in use, bad certificate): one line, exit 1."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _credentials(spec: RunSpec) -> grpc.ServerCredentials | None:
    flags = spec.flags
    if flags.tls_cert_path is None or flags.tls_key_path is None:
        return None
    try:
        cert = flags.tls_cert_path.read_bytes()
        key = flags.tls_key_path.read_bytes()
    except OSError as exc:
        raise GrpcStartError(f"--tls-cert-path/--tls-key-path: cannot read: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])


async def start_grpc(models: ServedModels, spec: RunSpec) -> tuple[grpc.aio.Server, int]:
    """A started server on --grpc-host/--grpc-port, and the port it listens on."""
    flags = spec.flags
    api_key = flags.api_key or None  # --api-key / DYN_API_KEY
    service = InferenceService(models, api_key)
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    address = _address(flags.grpc_host, flags.grpc_port)
    credentials = _credentials(spec)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:  # older grpcio says so with port 0, newer ones raise
        raise GrpcStartError(
            f"cannot listen on {address} for gRPC: {_why_not(flags.grpc_host, flags.grpc_port)}"
        )
    try:
        await server.start()
    except Exception as exc:  # a certificate grpc cannot use surfaces here
        raise GrpcStartError(f"cannot start the gRPC server on {address}: {exc}") from None
    return server, port


def _why_not(host: str, port: int) -> str:
    """Why grpc could not bind (it only says that it could not)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the address cannot be bound"


def grpc_url(spec: RunSpec, port: int) -> str:
    host = spec.flags.grpc_host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return _address(host, port)


def _fail(message: str) -> int:
    print(f"dynamo-run: error: {message}", file=sys.stderr, flush=True)
    return 1


async def run_grpc(loading: asyncio.Task[Any], spec: RunSpec) -> int:
    """``in=grpc``: serve until a signal (exit 0) or a failed model load (exit 1)."""
    try:
        server, port = await start_grpc(ServedModels(loading), spec)
    except GrpcStartError as exc:
        return _fail(str(exc))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and not stopping.done():
            if loading.cancelled() or loading.exception() is not None:
                return load_failed(loading)
            _announce(loading.result(), spec, port)
            await stopping
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        stopping.cancel()
        await server.stop(GRACEFUL_SHUTDOWN_S)


async def run_http_grpc(loading: asyncio.Task[Any], spec: RunSpec) -> int:
    """``in=http,grpc``: both servers over one set of served models (and so one metrics
    registry, whose /metrics is on the HTTP port); the HTTP server owns the lifetime
    (signals, failed loads)."""
    models = ServedModels(loading, admission=AdmissionSettings.from_flags(spec.flags))
    try:
        server, port = await start_grpc(models, spec)
    except GrpcStartError as exc:
        return _fail(str(exc))

    def announce(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            _announce(task.result(), spec, port)

    loading.add_done_callback(announce)
    try:
        return await run_http(loading, spec, models)
    finally:
        await server.stop(GRACEFUL_SHUTDOWN_S)


def _announce(loaded: Any, spec: RunSpec, port: int) -> None:
    scheme = "grpcs" if spec.flags.tls_cert_path else "grpc"
    print(
        f"dynamo-run: serving {describe(loaded)} over KServe gRPC at {scheme}://{grpc_url(spec, port)}",
        file=sys.stderr,
        flush=True,
    )
