"""What the runner starts for ``out=dyn``: a NATS connection and the remote models.

``in=http`` gets the whole directory (models come and go); the shell and batch get one model,
waited for until a worker serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from dynamo_run.errors import RunError
from dynamo_run.model.card import CardOverrides
from dynamo_run.pipeline.admission import AdmissionSettings
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.spec import RunSpec

# How long the shell and batch wait for a worker before giving up.
WAIT_FOR_WORKER_S = float(os.environ.get("DYN_WAIT_FOR_WORKER_S", "60"))
# Each shutdown step (stop watching, disconnect) gets this long before it is abandoned.
CLOSE_TIMEOUT_S = 5.0


class RemoteOutput:
    """The NATS connection and remote models of one run; ``overrides``: the card settings
    of the command line (chat template, parsers), applied to every worker's card."""

    def __init__(self, spec: RunSpec, overrides: CardOverrides) -> None:
        self.spec = spec
        self.overrides = overrides
        self.conn = None
        self.models = None

    async def load(self, for_http: bool):
        from dynamo_run.distributed.frontend import RemoteModels, RouterSettings
        from dynamo_run.distributed.nats_connect import connect_nats
        from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE

        flags = self.spec.flags
        try:
            self.conn = await connect_nats(
                flags.nats_url, token=flags.nats_token, listen=flags.nats_listen,
                name="dynamo-run frontend",
            )  # fmt: skip
        except Exception as exc:
            raise RunError(f"out=dyn: {exc}") from None
        if self.conn.share_url:
            print(
                f"dynamo-run: other hosts join with --nats-url {self.conn.share_url}",
                file=sys.stderr,
                flush=True,
            )
        endpoint = self.spec.output.endpoint
        prefix = f"{endpoint.namespace}.{endpoint.component}.{endpoint.name}" if endpoint else None
        self.models = RemoteModels(
            self.conn.client,
            prefix,
            RouterSettings(
                flags.router_mode,
                flags.kv_cache_block_size or DEFAULT_BLOCK_SIZE,
                flags.kv_overlap_score_weight,
                flags.router_temperature,
                flags.kv_events,
                flags.router_replica_sync,
            ),
            flags.migration_limit,
            self.spec.request_template,
            flags.generation_config,
            self.overrides,
            AdmissionSettings.from_flags(flags),
        )
        await self.models.start()
        if for_http:
            return self.models
        return await self._one_model()

    async def _one_model(self) -> ModelClient:
        assert self.models is not None
        wanted = self.spec.flags.model_name
        client = await self.models.wait_for_model(wanted, 0.5)
        if client is None:
            print(
                f"dynamo-run: waiting for a worker serving {wanted or 'a model'} in "
                f"{self.models.where}…",
                file=sys.stderr,
                flush=True,
            )
            client = await self.models.wait_for_model(wanted, WAIT_FOR_WORKER_S)
        if client is None:
            raise RunError(
                f"out=dyn: no worker serves {wanted or 'any model'} in {self.models.where} "
                f"(waited {WAIT_FOR_WORKER_S:g} s); start one with "
                "dynamo-run in=dyn://namespace.component.endpoint out=ENGINE"
            )
        return client

    async def close(self) -> None:
        """Stop watching and disconnect, each step bounded: a NATS server that stopped
        answering must not keep a finished shell or batch from exiting."""
        if self.models is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.models.stop(), CLOSE_TIMEOUT_S)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), CLOSE_TIMEOUT_S)
