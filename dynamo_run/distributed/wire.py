"""The messages of the request plane and of discovery, as msgpack (msgspec).

Request plane, per request: the frontend publishes ``Work`` to the instance's subject with
its reply inbox; the worker answers on that inbox with ``Ack`` at once, ``Out`` per engine
step, ``Heartbeat`` while nothing else is sent (a long prefill), and ``End`` or ``Fail``
last (``Fail.retryable`` says whether another instance may take the request over). ``Cancel`` on the same instance subject stops a request whose client went away.
"""

from __future__ import annotations

import msgspec

from dynamo_run.protocol.internal import EngineLoad, EngineOutput, PreprocessedRequest

# Subjects. Instance ids are hex, so every subject token is NATS-safe.
SUBJECT_PREFIX = "dyn"
DISCOVERY_BUCKET = "dynamo_instances"
CARD_BUCKET = "dynamo_model_cards"


def instance_subject(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{namespace}.{component}.{endpoint}.{instance_id}"


def instance_key(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    """The instance's key in the discovery bucket; its prefix selects an endpoint."""
    return f"{namespace}.{component}.{endpoint}.{instance_id}"


# --- frontend -> worker -------------------------------------------------------------------
class Work(msgspec.Struct, tag="work", array_like=True):
    request: PreprocessedRequest


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    request_id: str


ToWorker = Work | Cancel


# --- worker -> frontend (on the reply inbox) ----------------------------------------------
class Ack(msgspec.Struct, tag="ack", array_like=True):
    instance_id: str


class Out(msgspec.Struct, tag="out", array_like=True):
    output: EngineOutput


class Heartbeat(msgspec.Struct, tag="hb", array_like=True):
    pass


class End(msgspec.Struct, tag="end", array_like=True):
    pass


class Fail(msgspec.Struct, tag="fail", array_like=True):
    """The request failed on this instance. ``retryable``: nothing went wrong with the
    request itself (the instance is draining or shutting down), so the frontend may send it,
    or migrate what is left of it, to another instance."""

    message: str
    retryable: bool = False


ToFrontend = Ack | Out | Heartbeat | End | Fail

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_frontend = msgspec.msgpack.Decoder(ToFrontend)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_worker(data: bytes) -> Work | Cancel:
    return _to_worker.decode(data)


def decode_to_frontend(data: bytes) -> Ack | Out | Heartbeat | End | Fail:
    return _to_frontend.decode(data)


# --- discovery ----------------------------------------------------------------------------
class InstanceRecord(msgspec.Struct, omit_defaults=True):
    """What a worker publishes about itself, refreshed every lease period."""

    instance_id: str
    namespace: str
    component: str
    endpoint: str
    subject: str
    model: str
    engine: str
    host: str
    pid: int
    card_digest: str  # name of the model card in the card store
    started_at: float
    updated_at: float
    lease_s: float
    load: EngineLoad = msgspec.field(default_factory=EngineLoad)
    draining: bool = False
    # Guided decoding the worker's engine can enforce (response_format, forced tool calls).
    supports_json_object: bool = False
    supports_json_schema: bool = False

    @property
    def key(self) -> str:
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)


def encode_record(record: InstanceRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_record(data: bytes) -> InstanceRecord:
    return msgspec.json.decode(data, type=InstanceRecord)
