"""``dynamo-run ps``: the live worker instances in discovery, like ``ollama ps``."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Annotated, Any

import msgspec
import typer

from dynamo_run.click_compat import click_errors
from dynamo_run.distributed.wire import InstanceRecord
from dynamo_run.settings import SpecError
from dynamo_run.settings_cli import ConfigOption, resolve_settings, with_settings

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


async def live_instances(nc, namespace: str | None = None) -> list[InstanceRecord]:
    """Instances whose lease is current, read once from the discovery bucket."""
    from nats.js.errors import BucketNotFoundError, NoKeysError

    from dynamo_run.distributed.discovery import is_live, wall_clock_age
    from dynamo_run.distributed.wire import DISCOVERY_BUCKET, decode_record

    js = nc.jetstream()
    try:
        bucket = await js.key_value(DISCOVERY_BUCKET)
        keys = await bucket.keys()
    except (BucketNotFoundError, NoKeysError):
        return []
    now = time.time()
    records = []
    for key in keys:
        if namespace and not key.startswith(f"{namespace}."):
            continue
        try:
            entry = await bucket.get(key)
            record = decode_record(entry.value)
        except Exception:
            continue  # deleted meanwhile, or not ours
        if is_live(record, wall_clock_age(record, now), own_clock=False):
            records.append(record)
    return sorted(records, key=lambda r: (r.model, r.namespace, r.component, r.started_at))


async def cached_blocks(nc, namespace: str | None, timeout: float = 2.0) -> dict[str, int]:
    """KV blocks each instance holds, from a replay of the KV event stream (what a KV-aware
    router knows); empty when no worker publishes KV events."""
    from nats.js.errors import NotFoundError

    from dynamo_run.distributed.kv_events import KV_STREAM, KvEventSubscriber
    from dynamo_run.distributed.kv_index import KvIndex

    js = nc.jetstream()
    try:
        pending = (await js.stream_info(KV_STREAM)).state.messages
    except NotFoundError:
        return {}
    index = KvIndex()
    subscriber = KvEventSubscriber(nc, None, index.apply)
    await subscriber.start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while subscriber.received < pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await subscriber.stop()
    return {instance: index.cached_blocks(instance) for instance in index.instances()}


def _uptime(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_table(records: list[InstanceRecord], blocks: dict[str, int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "ENDPOINT", "INSTANCE", "HOST", "PID", "ENGINE", "LOAD", "UPTIME"):
        table.add_column(column)
    now = time.time()
    for r in records:
        load = f"{r.load.in_flight} in flight"
        if r.load.slots_total:
            load += f", {r.load.slots_busy}/{r.load.slots_total} slots"
        if r.load.kv_blocks_total:
            load += f", KV {r.load.kv_blocks_used}/{r.load.kv_blocks_total} blocks"
        if r.instance_id in blocks:
            load += f", {blocks[r.instance_id]} cached blocks"
        if r.draining:
            load += " (stopping)"
        table.add_row(
            r.model,
            f"dyn://{r.namespace}.{r.component}.{r.endpoint}",
            r.instance_id,
            r.host,
            str(r.pid),
            r.engine,
            load,
            _uptime(now - r.started_at),
        )
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
@with_settings(["nats_url", "nats_token"])
def ps(
    ctx: typer.Context,
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, for scripts.")] = False,
    config: ConfigOption = None,
    **settings: Any,
) -> None:
    """List the live worker instances: model, endpoint, host, engine, load, uptime."""
    from dynamo_run.distributed.nats_connect import NatsError, connect_nats
    from dynamo_run.distributed.nats_embedded import read_state, state_dir

    try:
        resolved = resolve_settings(ctx, settings, config)
    except SpecError as exc:
        print(f"dynamo-run: error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    nats_url, nats_token = resolved.nats_url, resolved.nats_token

    async def main() -> tuple[list[InstanceRecord], dict[str, int]] | None:
        if not nats_url and read_state(state_dir()) is None:
            return None  # no embedded server on this host: don't start one just to look
        conn = await connect_nats(nats_url, token=nats_token, name="dynamo-run ps")
        try:
            records = await live_instances(conn.client, namespace)
            blocks = await cached_blocks(conn.client, namespace) if records else {}
            return records, blocks
        finally:
            await conn.close()

    try:
        found = asyncio.run(main())
    except NatsError as exc:
        print(f"dynamo-run: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    if found is None:
        if as_json:
            print("[]")
        else:
            print("no NATS server is running on this host: no workers", file=sys.stderr)
        return
    records, blocks = found
    if as_json:
        rows = [
            {**msgspec.to_builtins(r), "kv_cached_blocks": blocks.get(r.instance_id)}
            for r in records
        ]
        print(json.dumps(rows, indent=2))
    elif not records:
        print("no live worker instances", file=sys.stderr)
    else:
        render_table(records, blocks)


def main(argv: list[str]) -> int:
    try:  # not standalone, click returns an Exit's code rather than raising it
        result = app(args=argv, prog_name="dynamo-run ps", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        if isinstance(exc, click_errors.UsageError):
            print(f"dynamo-run ps: error: {exc.format_message()}", file=sys.stderr)
            return 2
        raise
    return result if isinstance(result, int) else 0
