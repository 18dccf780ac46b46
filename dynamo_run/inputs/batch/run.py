"""``in=batch:FILE.jsonl``: run every line of a JSON Lines file, losing nothing.

Requests run concurrently (enough to keep a continuous-batching engine full); their output
lines are written in input order, one flushed line each, so an interrupted run (Ctrl-C,
``kill -9``) is resumed by rerunning the same command: the done lines are a prefix of the
input. A line that cannot run gets an error line in its place and the rest still runs.

Exit codes: 0 all lines ok, 1 some lines failed, 2 the input or output cannot be used,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dynamo_run.errors import RunError
from dynamo_run.inputs.batch.executor import BatchExecutor
from dynamo_run.inputs.batch.lines import LineError, parse_line
from dynamo_run.inputs.batch.progress import BatchProgress, Tally
from dynamo_run.inputs.batch.records import error_record, outcome
from dynamo_run.inputs.batch.resume import (
    STATE_SUFFIX,
    BatchState,
    InputInfo,
    Resume,
    iter_requests,
    read_resume,
    scan_input,
)
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.spec import RunSpec, SpecError

log = logging.getLogger("dynamo_run.batch")

DEFAULT_OUTPUT_NAME = "output.jsonl"  # Dynamo's name, beside the input file
DEFAULT_CONCURRENCY = 8
# Lines started but not yet written: finished lines wait behind a slow one up to this many,
# so one long request does not starve the engine (a few KiB each, so cheap to hold).
MIN_WINDOW = 256
WINDOW_PER_SLOT = 16
FSYNC_INTERVAL_S = 1.0
EXIT_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _note(message: str) -> None:
    print(f"batch: {message}", file=sys.stderr, flush=True)


def output_path(spec: RunSpec, info: InputInfo) -> Path:
    """--output, or ``output.jsonl`` in the input's folder (as Dynamo does)."""
    given = spec.flags.output
    out = given.expanduser() if given else info.path.parent / DEFAULT_OUTPUT_NAME
    flag = f"--output {out}" if given else f"in=batch: the default output {out}"
    if out.is_dir():
        raise SpecError(f"{flag}: is a folder; name a file")
    if not out.parent.is_dir():
        raise SpecError(f"{flag}: folder {out.parent} does not exist")
    if out.exists() and out.resolve() == info.path.resolve():
        raise SpecError(f"{flag}: is the input file itself; pass --output OTHER.jsonl")
    return out


def _model_id(model: str | None) -> str | None:
    if model is None:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def prepare_output(output: Path, state: BatchState, info: InputInfo, overwrite: bool) -> Resume:
    """Start the output afresh, or check it belongs to this batch and find where to resume."""
    state_path = output.with_name(output.name + STATE_SUFFIX)
    try:
        if overwrite or not output.exists() or output.stat().st_size == 0:
            output.write_bytes(b"")  # empty first: an old state never pairs with new lines
            state.save(state_path)
            return Resume()
        saved = BatchState.load(state_path)
        if saved is None:
            raise SpecError(
                f"{output}: already exists and has no batch state ({state_path.name}); "
                "pass --overwrite to replace it or --output to write elsewhere"
            )
        diffs = saved.differences(state)
        if diffs:
            raise SpecError(
                f"{output}: cannot resume: {'; '.join(diffs)}; pass --overwrite to start "
                "afresh or --output to write elsewhere"
            )
        resume = read_resume(info, output)
        if resume.dropped_bytes:
            os.truncate(output, resume.valid_bytes)
            _note(f"dropped an incomplete last line ({resume.dropped_bytes} bytes); redoing it")
        return resume
    except OSError as exc:
        raise SpecError(f"{output}: cannot read or write: {exc.strerror or exc}") from None


class LineWriter:
    """Appends output lines, flushing each one and fsyncing now and then."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = path.open("ab")
        self._synced = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._file.flush()
        now = time.monotonic()
        if now - self._synced >= FSYNC_INTERVAL_S:
            os.fsync(self._file.fileno())
            self._synced = now

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()


def _concurrency(spec: RunSpec, client: ModelClient) -> int:
    if spec.flags.batch_concurrency:
        return spec.flags.batch_concurrency
    engine_max = client.engine.capabilities().max_concurrency
    if engine_max is not None and engine_max > 0:
        return engine_max
    return DEFAULT_CONCURRENCY


async def run_lines(
    info: InputInfo,
    resume: Resume,
    executor: BatchExecutor,
    concurrency: int,
    writer: LineWriter,
    progress: BatchProgress,
) -> None:
    """Run the input from where ``resume`` left off, writing results in input order.

    A producer starts up to ``concurrency`` requests; the consumer awaits them in input
    order. The queue bounds how many finished lines wait behind a slow one (memory)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[asyncio.Future[dict[str, Any]] | None] = asyncio.Queue(
        maxsize=max(MIN_WINDOW, concurrency * WINDOW_PER_SLOT)
    )
    slots = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task[dict[str, Any]]] = set()
    seen_ids = set(resume.custom_ids)
    failure: list[BaseException] = []
    preprocessor = executor.client.preprocessor

    def finished(task: asyncio.Task[dict[str, Any]]) -> None:
        in_flight.discard(task)
        slots.release()

    async def produce() -> None:
        try:
            for number, raw in itertools.islice(iter_requests(info.path), resume.done, None):
                item = parse_line(raw, number, info.default_form, preprocessor)
                if item.custom_id is not None:
                    if item.custom_id in seen_ids and item.error is None:
                        item.error = LineError(
                            "duplicate_custom_id",
                            f"custom_id {item.custom_id!r} was already used by an earlier line",
                        )
                    seen_ids.add(item.custom_id)
                if item.error is not None:
                    future: asyncio.Future[dict[str, Any]] = loop.create_future()
                    future.set_result(error_record(item, item.error))
                else:
                    await slots.acquire()
                    task = asyncio.create_task(executor.run(item))
                    in_flight.add(task)
                    task.add_done_callback(finished)
                    future = task
                await queue.put(future)
        except Exception as exc:  # reading the input failed mid-run
            failure.append(exc)
        await queue.put(None)

    producer = asyncio.create_task(produce())
    try:
        while (future := await queue.get()) is not None:
            record = await future
            writer.write(record)
            progress.update(outcome(record))
        if failure:
            raise failure[0]
    finally:
        producer.cancel()
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(producer, *in_flight, return_exceptions=True)


def _catch_signals(stop: asyncio.Event, caught: list[int]) -> Callable[[], None]:
    """Turn Ctrl-C / SIGTERM into a clean stop; returns a function that undoes it."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in EXIT_SIGNALS}
    installed = []

    def on_signal(sig: int) -> None:
        caught.append(sig)
        stop.set()

    for sig in EXIT_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here: default behaviour stays

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)
            with contextlib.suppress(OSError, TypeError, ValueError):
                signal.signal(sig, previous[sig])

    return restore


async def _until_stopped(work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first (then cancel it). True if stopped."""
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if work.done():
        work.result()
        return False
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return True


async def _run(
    info: InputInfo,
    resume: Resume,
    client: ModelClient,
    spec: RunSpec,
    output: Path,
    progress: BatchProgress,
    stop: asyncio.Event,
) -> bool:
    """Run the remaining lines with the loaded model. True if stopped by a signal."""
    executor = BatchExecutor(client, spec.output.kind)
    writer = LineWriter(output)
    progress.begin()
    try:
        concurrency = _concurrency(spec, client)
        work = asyncio.ensure_future(
            run_lines(info, resume, executor, concurrency, writer, progress)
        )
        return await _until_stopped(work, stop)
    finally:
        writer.close()
        progress.close()


async def run_batch(loading: asyncio.Task[ModelClient], spec: RunSpec) -> int:
    """Entry point for ``in=batch:FILE``. Returns the exit code."""
    if spec.input.batch_path is None:
        raise SpecError("in=batch needs a file: in=batch:prompts.jsonl")
    info = scan_input(spec.input.batch_path)
    output = output_path(spec, info)
    state = BatchState.for_run(info, spec.output.kind, _model_id(spec.model))
    resume = prepare_output(output, state, info, spec.flags.overwrite)
    before = Tally(resume.ok, resume.failed, resume.tokens_in, resume.tokens_out)
    progress = BatchProgress(info.requests, before, output)
    if resume.done:
        _note(f"resuming: {resume.done} of {info.requests} lines already in {output}")

    stop = asyncio.Event()
    caught: list[int] = []
    restore = _catch_signals(stop, caught)
    stopped = False
    try:
        if resume.done < info.requests:
            stopped = await _until_stopped(loading, stop)
            if not stopped:
                client = loading.result()
                stopped = await _run(info, resume, client, spec, output, progress, stop)
    except OSError as exc:  # the disk filled up, the file vanished: what is written stays
        progress.summary(interrupted=True)
        raise RunError(
            f"batch: cannot write {output}: {exc.strerror or exc}; fix it and rerun the "
            "same command to resume"
        ) from None
    finally:
        restore()
    progress.summary(interrupted=stopped)
    if stopped:
        return EXIT_SIGNALS.get(caught[0], 130) if caught else 130
    return 1 if before.failed + progress.now.failed else 0
