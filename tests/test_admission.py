"""Admission arithmetic (pure): what a model admits beyond its capacity, with the real
mocker engine as the local case."""

from __future__ import annotations

import pytest

from dynamo_run.engine import EngineConfig
from dynamo_run.mocker.config import parse_settings
from dynamo_run.mocker.engine import MockerEngine
from dynamo_run.pipeline.admission import (
    Admission,
    AdmissionSettings,
    Capacity,
    Overloaded,
    local_capacity,
)


def test_capacity_plus_twice_it_by_default_then_overloaded():
    gate = Admission(lambda: Capacity(4, 4), AdmissionSettings(), "m")
    tickets = [gate.enter() for _ in range(12)]  # 4 slots + a queue of 8
    with pytest.raises(Overloaded, match=r"model `m` is overloaded: .* 8 requests wait"):
        gate.enter()
    tickets[0].release()
    tickets[0].release()  # idempotent: frees one place, not two
    third = gate.enter()
    with pytest.raises(Overloaded):
        gate.check()
    for ticket in [*tickets, third]:
        ticket.release()
    assert gate.admitted == 0


def test_queue_limit_zero_refuses_as_soon_as_the_slots_are_taken():
    gate = Admission(lambda: Capacity(2, 2), AdmissionSettings(queue_limit=0), "m")
    gate.enter(2)
    with pytest.raises(Overloaded):
        gate.enter()


def test_an_idle_model_admits_any_number_of_choices():
    gate = Admission(lambda: Capacity(1, 1), AdmissionSettings(queue_limit=0), "m")
    ticket = gate.enter(5)  # n=5 on one slot: queued in the engine, not refused
    with pytest.raises(Overloaded):
        gate.enter()
    ticket.release()
    gate.enter()


def test_unknown_capacity_is_not_limited():
    gate = Admission(lambda: None, AdmissionSettings(queue_limit=0), "m")
    for _ in range(100):
        gate.enter()


def test_busy_workers_leave_only_the_queue():
    # Every worker over the KV threshold: nothing is free now, the queue (sized from all the
    # slots, busy or not) still takes its share.
    gate = Admission(lambda: Capacity(0, 3), AdmissionSettings(), "m")
    gate.enter()
    for _ in range(5):
        gate.enter()
    with pytest.raises(Overloaded):
        gate.enter()


def test_local_capacity_of_the_mocker():
    engine = MockerEngine(parse_settings(EngineConfig(extra={"max_num_seqs": 6})), [1, 2, 3])
    assert local_capacity(engine, AdmissionSettings()) == Capacity(6, 6)
    assert local_capacity(engine, AdmissionSettings(worker_limit=2)) == Capacity(2, 2)
    assert local_capacity(engine, AdmissionSettings(worker_limit=0)) is None
    settings = AdmissionSettings(decode_blocks_threshold=0.5)
    assert settings.blocks_busy(8, 16) and not settings.blocks_busy(7, 16)
    assert not AdmissionSettings().blocks_busy(16, 16)  # off by default
