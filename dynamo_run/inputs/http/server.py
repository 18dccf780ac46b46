"""``in=http``: serve the OpenAI API with uvicorn inside the runner's event loop.

The server listens at once and answers 503 while the model loads; if loading fails it
stops and the run exits non-zero with the one-line reason. SIGINT/SIGTERM shut it down
gracefully (stop accepting, let in-flight requests end, up to a timeout) and return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Iterator

import uvicorn

from dynamo_run.inputs.http.app import create_app
from dynamo_run.pipeline.admission import AdmissionSettings
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.pipeline.serving import ServedModels, describe, load_failed
from dynamo_run.spec import RunSpec

log = logging.getLogger("dynamo_run.http")

# Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cancelled.
GRACEFUL_SHUTDOWN_S = 10


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal ends ``serve()`` normally: uvicorn re-raises
    the captured signal afterwards, which would kill the process before the runner closes
    the engine."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def _wait_tasks_to_complete(self) -> None:
        if not self.config.is_ssl:
            await super()._wait_tasks_to_complete()
            return
        reaper = asyncio.create_task(self._abort_closed_tls())
        try:
            await super()._wait_tasks_to_complete()
        finally:
            reaper.cancel()

    async def _abort_closed_tls(self) -> None:
        """A closed TLS connection waits (30 s in asyncio) for the client's close_notify,
        which an idle keep-alive client never sends; drop it once its data is flushed."""
        while True:
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if (
                    transport is not None
                    and transport.is_closing()
                    and transport.get_write_buffer_size() == 0
                ):
                    transport.abort()
            await asyncio.sleep(0.05)


def _bind(host: str, port: int) -> socket.socket:
    """Listen on host:port (IPv4 or IPv6); OSError says why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections
    # only then, and without it Nagle + delayed ACK add ~40 ms to every first chunk.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _quiet_uvicorn(verbosity: int) -> None:
    """uvicorn's own info lines duplicate ours; keep its warnings and errors."""
    level = logging.DEBUG if verbosity >= 2 else logging.WARNING
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    if verbosity >= 0:  # one line per request unless the user asked for less (DYN_LOG=error)
        logging.getLogger("dynamo_run.http.access").setLevel(logging.INFO)


def _fail(message: str) -> int:
    print(f"dynamo-run: error: {message}", file=sys.stderr, flush=True)
    return 1


async def run_http(
    loading: asyncio.Task[ModelClient], spec: RunSpec, models: ServedModels | None = None
) -> int:
    """Serve until a signal (exit 0) or a failed model load (exit 1). ``models``: shared
    with another input of the process (in=http,grpc), with its metrics registry."""
    flags = spec.flags
    api_key = flags.api_key or None  # --api-key / DYN_API_KEY
    _quiet_uvicorn(flags.verbosity)
    models = models or ServedModels(loading, admission=AdmissionSettings.from_flags(flags))
    tls = flags.tls_cert_path is not None
    config = uvicorn.Config(
        create_app(models, api_key, flags.sse_keepalive_s),
        log_config=None,
        access_log=False,
        lifespan="off",
        http="auto",  # httptools when installed, else h11
        ws="none",
        server_header=False,
        ssl_certfile=str(flags.tls_cert_path) if tls else None,
        ssl_keyfile=str(flags.tls_key_path) if flags.tls_key_path else None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    try:
        config.load()
    except (ssl.SSLError, OSError) as exc:
        return _fail(f"--tls-cert-path/--tls-key-path: cannot load the certificate: {exc}")
    host, port = flags.http_host, flags.http_port
    try:
        sock = _bind(host, port)
    except OSError as exc:
        return _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"{'https' if tls else 'http'}://{_url_host(host)}:{sock.getsockname()[1]}/v1"
    try:
        await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and not serving.done():
            if loading.cancelled() or loading.exception() is not None:
                server.should_exit = True
                await serving
                return load_failed(loading)
            print(
                f"dynamo-run: serving {describe(loading.result())} at {url}",
                file=sys.stderr,
                flush=True,
            )
        await serving
    except SystemExit:  # uvicorn exits on start-up failures after logging them
        return 1
    finally:
        sock.close()
    if loading.done() and not loading.cancelled() and loading.exception() is not None:
        return load_failed(loading)
    return 0


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"[{host}]" if ":" in host else host
