"""The one way dynamo-run gets a NATS connection: :func:`connect_nats`.

With a URL (``--nats-url`` / ``NATS_SERVER``) it connects to that server or cluster as it is.
Without one it uses the embedded server of this host (:mod:`.nats_embedded`), starting it if
no other dynamo-run process has. Either way the client reconnects forever, so a server
restarted under load is picked up again; a failure to connect at start is a NatsError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.js.errors import ServiceUnavailableError

from dynamo_run.distributed.errors import NatsError
from dynamo_run.distributed.nats_embedded import (
    DirLock,
    EmbeddedServer,
    find_or_start_server,
    find_running_server,
    read_state,
    state_dir,
)

__all__ = ["NatsConnection", "NatsError", "connect_existing", "connect_nats"]

log = logging.getLogger("dynamo_run.distributed.nats")

CONNECT_TIMEOUT_S = 2.0  # per attempt (TCP connect, INFO, CONNECT/PONG)
RECONNECT_WAIT_S = 0.5  # between attempts on one server, at start and after a disconnect
INITIAL_ATTEMPTS = 3  # per server at start, before connect_nats gives up
PING_INTERVAL_S = 20  # a silent dead server is noticed after about 3 pings
MAX_OUTSTANDING_PINGS = 3


@dataclass
class NatsConnection:
    """A connected nats-py client and where it is connected.

    ``client``: the nats.aio.client.Client (``client.jetstream()`` for JetStream/KV).
    ``url``: the server URL(s) used, without credentials. ``embedded``: the host's embedded
    server (``server`` then describes it: pids, port, whether this process started it).
    ``token``: the token in use, if any. ``share_url``: ``nats://TOKEN@HOST:PORT`` for other
    hosts, when the embedded server listens beyond loopback.
    """

    client: Client
    url: str
    embedded: bool
    token: str | None = None
    server: EmbeddedServer | None = None

    @property
    def share_url(self) -> str | None:
        return self.server.share_url if self.server is not None else None

    async def close(self) -> None:
        """Close the client (flushing what it buffered). The embedded server stops by itself
        once its last client is gone."""
        if not self.client.is_closed:
            await self.client.close()

    async def __aenter__(self) -> NatsConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect_nats(
    url: str | None = None,
    token: str | None = None,
    listen: str | None = None,
    name: str = "dynamo-run",
    *,
    grace_s: float | None = None,
) -> NatsConnection:
    """Connect to NATS, to the given server or to this host's embedded one.

    ``url``: ``--nats-url`` / ``NATS_SERVER``: a server or a comma-separated list of the
    servers of a cluster (``nats://host:4222``, ``host:4222``, ``nats://TOKEN@host:4222``);
    connected to as it is and never stopped by us. None: the embedded server (below).
    ``token``: ``--nats-token`` / ``NATS_TOKEN``: the token to present; for the embedded
    server, the token it requires (it must match the running one, if any).
    ``listen``: ``--nats-listen`` ``HOST:PORT`` (embedded only): start the embedded server
    listening there for other hosts, with token auth (``token``, or a generated one that
    ``share_url`` carries, to print for the other hosts). NatsError if an embedded server
    already runs on another address (e.g. loopback only).
    ``name``: the client name the server shows in its connection list.
    ``grace_s``: seconds the embedded server lingers after its last client leaves, when this
    call starts it (default ``DYN_NATS_GRACE_S``, else 5).

    The embedded server: JetStream on, bound to 127.0.0.1 (or ``listen``) on a free port,
    its store and state under ``$DYN_NATS_DIR``, else ``$XDG_RUNTIME_DIR/dynamo-run/nats``,
    else ``~/.local/state/dynamo-run/nats``. The first process of the host starts it; the
    others find it through a state file, under a lock; it stops a few seconds after its last
    client is gone (closed, crashed or killed).

    The client reconnects forever (every ``RECONNECT_WAIT_S``) once connected; failing to
    connect at start raises NatsError naming the URL (auth errors say so).
    """
    token = token or None
    if url is not None and url.strip():
        if listen is not None:
            raise NatsError(
                "a NATS listen address only applies to the embedded server, not --nats-url"
            )
        servers = [part.strip() for part in url.split(",") if part.strip()]
        client = await _connect(servers, token, name)
        shown = ",".join(_redact(server) for server in servers)
        log.info("connected to NATS at %s", shown)
        return NatsConnection(client=client, url=shown, embedded=False, token=token)

    directory = state_dir()
    conn = await _connect_embedded(
        directory, lambda: find_or_start_server(directory, listen, token, grace_s), name
    )
    assert conn is not None
    return conn


async def connect_existing(
    url: str | None = None, token: str | None = None, name: str = "dynamo-run"
) -> NatsConnection | None:
    """Like :func:`connect_nats`, but never starts the embedded server: None when no embedded
    server runs on this host (for tools that only look, such as ``dynamo-run ps``)."""
    if url is not None and url.strip():
        return await connect_nats(url, token=token, name=name)
    directory = state_dir()
    if read_state(directory) is None:
        return None
    return await _connect_embedded(directory, lambda: find_running_server(directory), name)


async def _connect_embedded(
    directory: Path, find: Callable[[], EmbeddedServer | None], name: str
) -> NatsConnection | None:
    """Find the server with ``find`` and connect to it, all under the state lock."""
    lock = DirLock(directory)

    def locked_find() -> EmbeddedServer | None:
        lock.acquire()
        try:
            server = find()
        except BaseException:
            lock.release()
            raise
        if server is None:
            lock.release()
        return server

    finding = asyncio.ensure_future(asyncio.to_thread(locked_find))
    try:
        server = await asyncio.shield(finding)
    except asyncio.CancelledError:
        # The thread runs on: release the lock whenever it is done with it.
        finding.add_done_callback(lambda _: lock.release())
        raise
    if server is None:
        return None
    try:
        # Still under the lock: the server cannot stop before it counts this connection.
        client = await _connect([server.url], server.token, name)
    finally:
        lock.release()
    return NatsConnection(
        client=client, url=server.url, embedded=True, token=server.token, server=server
    )


def _redact(url: str) -> str:
    """The URL without its credentials (they must not end up in logs or errors)."""
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


async def _connect(servers: list[str], token: str | None, name: str) -> Client:
    shown = ",".join(_redact(server) for server in servers)
    errors: list[BaseException] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if connected:
            log.debug("NATS %s: %s", shown, exc)
        else:
            errors.append(exc)

    async def on_disconnected() -> None:
        if connected and not client.is_closed:  # close() reports a disconnection too
            log.warning("disconnected from NATS at %s: reconnecting", shown)

    async def on_reconnected() -> None:
        url = client.connected_url
        log.warning("reconnected to NATS at %s", _redact(url.geturl()) if url else shown)

    client = Client()
    try:
        await client.connect(
            servers=servers,
            name=name,
            token=token,
            allow_reconnect=True,
            max_reconnect_attempts=INITIAL_ATTEMPTS - 1,
            reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]  # float works
            connect_timeout=CONNECT_TIMEOUT_S,  # type: ignore[arg-type]
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except Exception as exc:
        errors.append(exc)
        if not client.is_closed:
            try:
                await client.close()
            except Exception:  # it never connected: nothing to flush
                log.debug("closing a failed NATS client", exc_info=True)
        raise NatsError(_explain(shown, errors)) from None
    try:
        await _require_jetstream(client, shown)
    except NatsError:
        await client.close()
        raise
    # Attempts were bounded to fail fast at start; from now on, never give up.
    client.options["max_reconnect_attempts"] = -1
    connected = True
    return client


async def _require_jetstream(client: Client, shown: str) -> None:
    """NatsError unless the server has JetStream, which discovery keeps its buckets in.

    Asked once here, where every process first connects: otherwise the first bucket a worker,
    frontend or ``ps`` opens fails with nats-py's bare ServiceUnavailableError."""
    try:
        await client.jetstream().account_info()
    except ServiceUnavailableError as exc:
        if exc.description is not None:  # JetStream answered: enabled, but not available now
            raise NatsError(
                f"JetStream at NATS {shown} is unavailable: {exc.description}"
            ) from None
        raise NatsError(  # no one answers JetStream's API: the server runs without it
            f"NATS at {shown} runs without JetStream, which dynamo-run needs for discovery: "
            "start nats-server with -js (or put `jetstream {}` in its config)"
        ) from None


def _explain(shown: str, errors: list[BaseException]) -> str:
    texts = [str(exc) or type(exc).__name__ for exc in errors]
    if any("authorization violation" in text.lower() for text in texts):
        return (
            f"NATS at {shown} refused the connection: authorization violation "
            "(missing or wrong token; give it with --nats-token or NATS_TOKEN)"
        )
    meaningful = [
        text
        for exc, text in zip(errors, texts, strict=True)
        if type(exc).__name__ not in ("NoServersError", "CancelledError")
    ]
    reason = meaningful[-1] if meaningful else texts[-1] if texts else "unknown error"
    if reason.startswith("nats: "):
        reason = reason[len("nats: ") :]
    return f"cannot connect to NATS at {shown}: {reason}"
