"""The pure parts of distribution: wire format, model card transfer, router, continuation,
and the request plane client's stream against a fake NATS connection."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import msgspec
import pytest

from dynamo_run.distributed.discovery import CLOCK_SKEW_S, is_live, wall_clock_age
from dynamo_run.distributed.failure_log import FailureLog
from dynamo_run.distributed.remote_engine import _continuation
from dynamo_run.distributed.request_plane import RequestPlaneClient, WorkerFailed, WorkerLost
from dynamo_run.distributed.router import Router
from dynamo_run.distributed.wire import (
    Ack,
    Cancel,
    End,
    Fail,
    Heartbeat,
    InstanceRecord,
    Out,
    Work,
    decode_record,
    decode_to_frontend,
    decode_to_worker,
    encode,
    encode_record,
)
from dynamo_run.model.card_wire import card_digest, card_from_bytes, card_to_bytes
from dynamo_run.protocol.internal import (
    FINISH_LENGTH,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)


def request(max_tokens: int | None = 10, min_tokens: int = 0) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="req-1",
        token_ids=[1, 2, 3],
        sampling=SamplingOptions(temperature=0.7, seed=5),
        stop=StopConditions(max_tokens=max_tokens, stop_token_ids=[2], min_tokens=min_tokens),
    )


def record(instance_id: str, draining: bool = False) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(
        instance_id=instance_id, namespace="ns", component="c", endpoint="e",
        subject=f"dyn.ns.c.e.{instance_id}", model="m", engine="echo", host="h", pid=1,
        card_digest="d", started_at=now, updated_at=now, lease_s=3.0, draining=draining,
    )  # fmt: skip


def test_messages_round_trip():
    work = Work(request())
    assert decode_to_worker(encode(work)) == work
    assert decode_to_worker(encode(Cancel("req-1"))) == Cancel("req-1")
    out = Out(EngineOutput(token_ids=[7, 8], cached_tokens=2))
    for message in (Ack("abc"), out, Heartbeat(), End(), Fail("boom")):
        assert decode_to_frontend(encode(message)) == message
    rec = record("abc")
    rec.load = EngineLoad(in_flight=2, slots_total=4, slots_busy=2)
    assert decode_record(encode_record(rec)) == rec


def test_fail_says_whether_another_instance_may_retry():
    refusal = Fail("instance a is shutting down", retryable=True)
    assert decode_to_frontend(encode(refusal)) == refusal

    # A Fail sent without the field (an engine error) is not retryable.
    class BareFail(msgspec.Struct, tag="fail", array_like=True):
        message: str

    assert decode_to_frontend(encode(BareFail("boom"))) == Fail("boom", retryable=False)


def test_model_card_travels_whole(default_card):
    data = card_to_bytes(default_card)
    assert len(data) < 2_000_000  # compressed; fits the object store in a few chunks
    card = card_from_bytes(data)
    text = "Hello, world! Ünïcödé and code: def f(x): return x"
    assert card.tokenizer.encode(text).ids == default_card.tokenizer.encode(text).ids
    messages = [{"role": "user", "content": "Hi"}]
    assert card.chat_template.render(messages, add_generation_prompt=True) == (
        default_card.chat_template.render(messages, add_generation_prompt=True)
    )
    assert (card.name, card.context_length, card.eos_token_ids, card.bos_token_id) == (
        default_card.name,
        default_card.context_length,
        default_card.eos_token_ids,
        default_card.bos_token_id,
    )
    assert card.generation_defaults == default_card.generation_defaults
    assert card_digest(data) == card_digest(card_to_bytes(default_card))


def test_round_robin_cycles_and_skips_tried_and_draining():
    router = Router("round-robin")
    live = [record("b"), record("a"), record("c")]
    picks = [router.pick("m", live).instance_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert router.pick("m", live, {"a", "b"}).instance_id == "c"
    assert router.pick("m", live, {"a", "b", "c"}) is None
    draining = [record("a", draining=True), record("b")]
    assert {router.pick("m", draining).instance_id for _ in range(4)} == {"b"}
    # Only draining instances left: still better than failing the request.
    assert router.pick("m", [record("a", draining=True)]).instance_id == "a"


def test_random_router_spreads():
    router = Router("random", seed=1)
    live = [record("a"), record("b"), record("c")]
    seen = {router.pick("m", live).instance_id for _ in range(50)}
    assert seen == {"a", "b", "c"}


def test_continuation_sends_prompt_plus_streamed_tokens_with_the_rest_of_the_budget():
    original = request(max_tokens=10, min_tokens=4)
    assert _continuation(original, [1, 2, 3], []) is original
    follow = _continuation(original, [1, 2, 3], [9, 9, 9])
    assert follow is not None
    assert follow.token_ids == [1, 2, 3, 9, 9, 9]
    assert follow.stop.max_tokens == 7 and follow.stop.min_tokens == 1
    assert follow.stop.stop_token_ids == [2]
    assert follow.sampling == original.sampling
    assert follow.request_id != original.request_id
    assert _continuation(original, [1, 2, 3], [9] * 10) is None
    unbounded = _continuation(request(max_tokens=None), [1, 2, 3], [9])
    assert unbounded is not None and unbounded.stop.max_tokens is None


class FakeNats:
    """What RequestPlaneClient uses of a nats-py client; replies are delivered by hand."""

    is_closed = False

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, str]] = []
        self.deliver = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb) -> None:  # type: ignore[no-untyped-def]
        self.deliver = cb

    async def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        self.published.append((subject, data, reply))

    async def reply(self, *messages: object) -> None:
        inbox = self.published[0][2]
        for message in messages:
            await self.deliver(SimpleNamespace(subject=inbox, data=encode(message)))


def test_request_plane_stream_takes_queued_bursts_in_order_and_times_out_when_silent():
    async def main() -> None:
        nc = FakeNats()
        plane = RequestPlaneClient(nc, ack_timeout=0.05, silence_timeout=0.1)
        await plane.start()

        # A burst already queued when the stream reads: every message, in order.
        stream = plane.stream("dyn.ns.c.e.a", "a", Work(request()))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        await nc.reply(Ack("a"), *(Out(EngineOutput([t])) for t in (5, 6, 7)), End())
        got = [(await first).token_ids] + [out.token_ids async for out in stream]
        assert got == [[5], [6], [7]]
        assert len(nc.published) == 1  # finished: no Cancel

        # A consumer that stops at the last output (before End arrives) sends no Cancel;
        # one that stops earlier does.
        for finish, cancels in ((FINISH_LENGTH, 0), (None, 1)):
            nc.published.clear()
            stream = plane.stream("dyn.ns.c.e.a", "a", Work(request()))
            first = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.01)
            await nc.reply(Ack("a"), Out(EngineOutput([5], finish)))
            assert (await first).token_ids == [5]
            await stream.aclose()
            sent = [decode_to_worker(data) for _, data, _ in nc.published[1:]]
            assert sent == [Cancel("req-1")] * cancels

        # No Ack within ack_timeout; then an Ack and silence beyond silence_timeout.
        for replies, what in (((), "acknowledged within 0.05 s"), ((Ack("a"),), "answered")):
            nc.published.clear()
            stream = plane.stream("dyn.ns.c.e.a", "a", Work(request()))
            pending = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.01)
            await nc.reply(*replies)
            with pytest.raises(WorkerLost, match=what):
                await pending
            assert decode_to_worker(nc.published[-1][1]) == Cancel("req-1")
        assert not plane._streams

    asyncio.run(main())


def test_request_plane_migrates_on_a_retryable_fail_only():
    """The flag decides, not the message text: a retryable refusal is WorkerLost (the
    frontend tries or migrates elsewhere), an engine error that merely mentions shutting
    down is WorkerFailed."""

    async def main() -> None:
        nc = FakeNats()
        plane = RequestPlaneClient(nc, ack_timeout=1.0, silence_timeout=1.0)
        await plane.start()
        cases = (
            (Fail("instance a is shutting down", retryable=True), WorkerLost),
            (Fail("RuntimeError: scheduler is shutting down"), WorkerFailed),
        )
        for fail, raised in cases:
            nc.published.clear()
            stream = plane.stream("dyn.ns.c.e.a", "a", Work(request()))
            pending = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.01)
            await nc.reply(fail)
            with pytest.raises(raised, match="shutting down"):
                await pending

    asyncio.run(main())


def test_one_liveness_rule_timed_on_one_clock_or_across_two():
    rec = record("a")  # lease 3 s
    assert is_live(rec, 3.0, own_clock=True) and not is_live(rec, 3.01, own_clock=True)
    # An age read from updated_at (the worker's clock) allows for the hosts' clock skew.
    assert is_live(rec, 3.0 + CLOCK_SKEW_S, own_clock=False)
    assert not is_live(rec, 3.01 + CLOCK_SKEW_S, own_clock=False)
    assert wall_clock_age(rec, now=rec.updated_at + 2.5) == 2.5


def test_failure_log_warns_first_then_once_per_interval_with_a_count(caplog):
    now = [100.0]
    failures = FailureLog(logging.getLogger("test.failures"), "lease renewal", 30.0, lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.failures")
    assert failures.failed(TimeoutError()) is True  # the first: at once
    for _ in range(5):
        now[0] += 5
        assert failures.failed(OSError("refused")) is False  # within 30 s: counted only
    now[0] += 6  # 31 s after the first warning
    assert failures.failed(OSError("refused")) is True
    failures.succeeded()
    failures.succeeded()  # nothing to say twice
    assert failures.failed(OSError("again")) is True  # a new streak warns at once
    assert failures.total == 8
    assert [r.getMessage() for r in caplog.records] == [
        "lease renewal failed: TimeoutError",
        "lease renewal failed 6 more times (7 in a row): OSError: refused",
        "lease renewal works again after 7 failures",
        "lease renewal failed: OSError: again",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
