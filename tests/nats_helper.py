"""A dynamo-run-like NATS client process for test_nats_embedded (run as a script).

    python tests/nats_helper.py [--url URL] [--token TOKEN] [--listen HOST:PORT]

Connects with connect_nats, prints one JSON line describing the connection (or
{"error": MESSAGE} and exits 1), then serves commands read from stdin, one per line:
``ping`` (a request/reply round trip through the server; prints {"pong": true}) and ``quit``
(or end of input: close and exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from dynamo_run.distributed.nats_connect import NatsError, connect_nats


def emit(value: dict) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--listen")
    args = parser.parse_args()
    try:
        conn = await connect_nats(args.url, token=args.token, listen=args.listen, name="helper")
    except NatsError as exc:
        emit({"error": str(exc)})
        return 1
    server = conn.server
    emit(
        {
            "url": conn.url,
            "embedded": conn.embedded,
            "started": server.started if server else None,
            "server_pid": server.server_pid if server else None,
            "supervisor_pid": server.supervisor_pid if server else None,
            "port": server.port if server else None,
        }
    )

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    inbox = conn.client.new_inbox()
    await conn.client.subscribe(inbox, cb=echo)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "ping":
                reply = await conn.client.request(inbox, b"ping", timeout=10)
                emit({"pong": reply.data == b"ping"})
            elif line in ("quit", ""):
                return 0
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
