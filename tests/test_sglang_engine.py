"""out=sglang: argument passing, the sampling mapping, streamed deltas, finish reasons,
cancellation, KV events and the one-line errors.

What needs SGLang's classes (its ``SamplingParams``, ``ServerArgs``, KV event types and ZMQ
publisher) runs against the real ones where sglang is installed (they import without a
GPU) and skips otherwise. Generation itself needs a CUDA GPU: here the engine's one call
into SGLang (``async_generate`` and the abort that goes with it) is replaced by a scripted
stream in SGLang's output format, and the real end-to-end test at the bottom skips unless
a GPU is present.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

try:
    import dynamo_run_sglang
except ImportError:  # the plugin is not installed in this environment: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engines" / "sglang"))
    import dynamo_run_sglang

from dynamo_run_sglang import create_engine, unusable_reason
from dynamo_run_sglang.config import engine_kwargs, page_size, publishes_to
from dynamo_run_sglang.engine import SGLangEngine, _start_sglang
from dynamo_run_sglang.kv_events import KvEventTranslator, ZmqKvSubscriber, decode_batch
from dynamo_run_sglang.launch import LOG_WRAPPERS
from dynamo_run_sglang.sampling import JSON_OBJECT_SCHEMA, generate_kwargs, sampling_params
from dynamo_run_sglang.stream import OutputStream, finish_reason

from dynamo_run.devices import has_nvidia_gpu
from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.engine_support.errors import load_error
from dynamo_run.engine_support.startup_log import root_cause
from dynamo_run.kv_blocks import block_hashes
from dynamo_run.model.card import load_model_card
from dynamo_run.protocol.internal import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    KV_CLEARED,
    KV_REMOVED,
    KV_STORED,
    KvCacheEvent,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)

NO_SGLANG = "sglang is not installed here (pip install 'dynamo-run[sglang]')"


def hf_card(path: str = "/models/llama") -> Any:
    """The fields of a Hugging Face model card that argument passing reads."""
    return SimpleNamespace(kind="hf", path=Path(path), context_length=4096)


def request(**kw: Any) -> PreprocessedRequest:
    return PreprocessedRequest(request_id="req-1", token_ids=[1, 2, 3], **kw)


# --- machine and model checks -------------------------------------------------------------
def test_unusable_reason_here_is_one_line() -> None:
    reason = unusable_reason()
    if has_nvidia_gpu() and dynamo_run_sglang.install.importlib.util.find_spec("sglang"):
        assert reason is None
        return
    assert reason is not None and "\n" not in reason and "sglang" in reason
    if dynamo_run_sglang.install.importlib.util.find_spec("sglang") is None:
        assert reason == "sglang is not installed: pip install 'dynamo-run[sglang]'"
    else:
        assert reason == "no NVIDIA GPU found (sglang needs CUDA)"


def test_unusable_reason_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dynamo_run_sglang.install.importlib.util, "find_spec", lambda name: None)
    assert unusable_reason() == "sglang is not installed: pip install 'dynamo-run[sglang]'"


def test_unusable_reason_hidden_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dynamo_run_sglang.install.importlib.util, "find_spec", lambda name: object()
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert unusable_reason() == "no NVIDIA GPU found (sglang needs CUDA)"


def test_gguf_model_is_one_line_error() -> None:
    card = load_model_card(None)  # the default model: a GGUF file
    with pytest.raises(EngineError) as err:
        create_engine(card, EngineConfig())
    text = str(err.value)
    assert "\n" not in text and "GGUF" in text and "out=llamacpp" in text


@pytest.mark.skipif(has_nvidia_gpu(), reason="this machine has a GPU")
def test_no_gpu_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dynamo_run_sglang.install.importlib.util, "find_spec", lambda name: object()
    )
    with pytest.raises(EngineError, match=r"^no NVIDIA GPU found \(sglang needs CUDA\)$"):
        create_engine(hf_card(), EngineConfig())


def test_bad_flag_reported_before_the_machine() -> None:
    with pytest.raises(EngineError, match="'--context-length' must be a positive integer"):
        create_engine(hf_card(), EngineConfig(context_length=0))


SCHEDULER_LOG = """\
[2026-11-27 23:40:01] Scheduler hit an exception: Traceback (most recent call last):
  File "sglang/srt/managers/scheduler.py", line 6362, in run_scheduler_process
    scheduler = Scheduler(server_args, port_args)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB
Traceback (most recent call last):
RuntimeError: Rank 0 scheduler died during initialization (exit code: -9).
"""


def test_root_cause_and_the_one_line_error(tmp_path: Path) -> None:
    log_file = tmp_path / "sglang.log"
    log_file.write_text(SCHEDULER_LOG)
    cause = root_cause(log_file, LOG_WRAPPERS)
    assert cause == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
        "GPU 0 has a total capacity of 79.1 GiB"
    )
    err = load_error("sglang", "/m", RuntimeError("Rank 0 scheduler died"), cause, log_file)
    text = str(err)
    assert "\n" not in text and text.startswith("sglang: out of GPU memory loading '/m'")
    assert f"(log: {log_file})" in text
    plain = load_error("sglang", "/m", ValueError("Unsupported architecture Foo\nmore"))
    assert str(plain) == "sglang: cannot load '/m': more"
    assert root_cause(tmp_path / "missing.log", LOG_WRAPPERS) is None


def test_child_sigquit_off_the_main_thread_does_not_kill_us() -> None:
    """SGLang's children SIGQUIT their parent when they fail to load; dynamo-run loads
    engines in a worker thread, where Python cannot install a handler. Run in a child
    process: without the guard it would die of SIGQUIT."""
    code = (
        "import os, signal, threading, time\n"
        "from dynamo_run_sglang.launch import sigquit_ignored_off_main_thread\n"
        "def launch():\n"
        "    with sigquit_ignored_off_main_thread():\n"
        "        os.kill(os.getpid(), signal.SIGQUIT)\n"
        "        time.sleep(0.2)\n"
        "t = threading.Thread(target=launch); t.start(); t.join()\n"
        "print('alive')\n"
    )
    plugin = str(Path(dynamo_run_sglang.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([plugin, *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr


# --- argument passing ---------------------------------------------------------------------
def test_engine_kwargs_defaults() -> None:
    kwargs = engine_kwargs(hf_card(), EngineConfig(), "tcp://127.0.0.1:5999")
    assert kwargs["model_path"] == "/models/llama"
    assert kwargs["page_size"] == 16  # our KV block size: one SGLang block = one router block
    assert "context_length" not in kwargs and "tp_size" not in kwargs
    events = json.loads(kwargs["kv_events_config"])
    assert events == {"publisher": "zmq", "endpoint": "tcp://127.0.0.1:5999", "topic": "kv-events"}
    assert publishes_to(kwargs, "tcp://127.0.0.1:5999")


def test_engine_kwargs_pass_the_flags_through() -> None:
    config = EngineConfig(
        context_length=2048,
        kv_cache_block_size=32,
        extra={"mem_fraction_static": 0.7, "attention_backend": "triton"},
    )
    config.tensor_parallel_size = 2
    kwargs = engine_kwargs(hf_card(), config)
    assert kwargs["context_length"] == 2048
    assert kwargs["page_size"] == 32 and page_size(kwargs) == 32
    assert kwargs["tp_size"] == 2
    assert kwargs["mem_fraction_static"] == 0.7 and kwargs["attention_backend"] == "triton"
    assert "kv_events_config" not in kwargs  # no subscriber, no publisher


def test_extra_engine_args_win() -> None:
    config = EngineConfig(
        kv_cache_block_size=32, extra={"page_size": 64, "kv_events_config": '{"publisher":"null"}'}
    )
    kwargs = engine_kwargs(hf_card(), config, "tcp://127.0.0.1:5999")
    assert page_size(kwargs) == 64
    assert kwargs["kv_events_config"] == '{"publisher":"null"}'
    assert not publishes_to(kwargs, "tcp://127.0.0.1:5999")


def test_model_path_in_extra_is_an_error() -> None:
    with pytest.raises(EngineError, match="as MODEL"):
        engine_kwargs(hf_card(), EngineConfig(extra={"model_path": "/elsewhere"}))


@pytest.fixture(scope="module")
def server_args_cls() -> Any:
    pytest.importorskip("sglang", reason=NO_SGLANG)
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


def test_engine_kwargs_are_sglang_server_args(server_args_cls: Any) -> None:
    config = EngineConfig(
        context_length=2048, kv_cache_block_size=32, extra={"mem_fraction_static": 0.7}
    )
    config.tensor_parallel_size = 2
    args = server_args_cls(**engine_kwargs(hf_card(), config, "tcp://127.0.0.1:5999"))
    assert (args.model_path, args.context_length, args.page_size, args.tp_size) == (
        "/models/llama",
        2048,
        32,
        2,
    )
    assert args.mem_fraction_static == 0.7
    assert json.loads(args.kv_events_config)["endpoint"] == "tcp://127.0.0.1:5999"


def test_misspelt_engine_arg_is_one_line_with_a_hint(server_args_cls: Any) -> None:
    kwargs = engine_kwargs(hf_card(), EngineConfig(extra={"mem_fraction_statc": 0.5}))
    with pytest.raises(EngineError) as err:
        _start_sglang(kwargs)
    text = str(err.value)
    assert "\n" not in text and "mem_fraction_statc" in text
    assert "did you mean 'mem_fraction_static'" in text


# --- sampling -----------------------------------------------------------------------------
FULL = request(
    sampling=SamplingOptions(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        json_schema={"type": "object", "properties": {"a": {"type": "integer"}}},
    ),
    stop=StopConditions(max_tokens=64, stop_token_ids=[2, 7], min_tokens=3),
    logprobs=5,
)


def test_sampling_maps_every_option() -> None:
    params = sampling_params(FULL)
    assert params == {
        "max_new_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "sampling_seed": 1234,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "stop_token_ids": [2, 7],
        "min_new_tokens": 3,
        "json_schema": json.dumps(FULL.sampling.json_schema),
    }


def test_sampling_defaults_left_to_the_engine() -> None:
    assert sampling_params(request(stop=StopConditions(max_tokens=8))) == {"max_new_tokens": 8}


def test_sampling_special_cases() -> None:
    params = sampling_params(
        request(
            sampling=SamplingOptions(top_k=0, json_object=True),
            stop=StopConditions(max_tokens=8, stop_token_ids=[2], ignore_eos=True),
        )
    )
    assert params["top_k"] == -1  # the whole vocabulary
    assert params["json_schema"] == JSON_OBJECT_SCHEMA
    assert params["ignore_eos"] is True and "stop_token_ids" not in params


def test_generate_kwargs() -> None:
    kwargs = generate_kwargs(FULL, "rid-1")
    assert kwargs["input_ids"] == [1, 2, 3] and kwargs["stream"] is True
    assert kwargs["rid"] == "rid-1"
    assert kwargs["return_logprob"] is True and kwargs["top_logprobs_num"] == 5
    plain = generate_kwargs(request(logprobs=0), "rid-2")
    assert plain["return_logprob"] is True and "top_logprobs_num" not in plain
    assert "return_logprob" not in generate_kwargs(request(), "rid-3")


def test_sampling_is_valid_for_sglang(server_args_cls: Any) -> None:
    from sglang.srt.sampling.sampling_params import SamplingParams

    sp = SamplingParams(**sampling_params(FULL))
    sp.verify(vocab_size=50_000)
    assert sp.stop_token_ids == {2, 7} and sp.sampling_seed == 1234
    assert (sp.temperature, sp.top_k, sp.min_new_tokens) == (0.7, 40, 3)
    greedy = SamplingParams(
        **sampling_params(
            request(
                sampling=SamplingOptions(temperature=0.0, top_k=0, json_object=True),
                stop=StopConditions(max_tokens=4, ignore_eos=True),
            )
        )
    )
    greedy.verify(vocab_size=50_000)
    assert greedy.top_k == 1  # SGLang's greedy
    assert greedy.ignore_eos and greedy.json_schema == JSON_OBJECT_SCHEMA


# --- streamed output ----------------------------------------------------------------------
def chunk(ids: list[int], finish: Any = None, cached: int = 0, **meta: Any) -> dict[str, Any]:
    return {
        "output_ids": ids,
        "meta_info": {"finish_reason": finish, "cached_tokens": cached, **meta},
    }


def test_cumulative_chunks_become_deltas() -> None:
    s = OutputStream()
    outs = [
        s.step(chunk([5], cached=16)),
        s.step(chunk([5, 6, 7])),
        s.step(chunk([5, 6, 7, 8], {"type": "length", "length": 4})),
    ]
    assert [o.token_ids for o in outs] == [[5], [6, 7], [8]]
    assert [o.cached_tokens for o in outs] == [16, None, None]  # reported once
    assert [o.finish_reason for o in outs] == [None, None, FINISH_LENGTH]


def test_incremental_chunks_pass_through() -> None:
    s = OutputStream(incremental=True)
    assert s.step(chunk([5, 6])).token_ids == [5, 6]
    last = s.step(chunk([7], {"type": "stop", "matched": 7}))
    assert last.token_ids == [7] and last.finish_reason == FINISH_STOP


def test_logprobs_follow_the_delta() -> None:
    s = OutputStream(logprobs=True)
    top = [[(-0.1, 5, None), (-2.0, 9, None)], [(-0.2, 6, None), (-3.0, 1, None)]]
    first = s.step(chunk([5], output_token_logprobs=[(-0.1, 5, None)], output_top_logprobs=top[:1]))
    second = s.step(
        chunk(
            [5, 6],
            {"type": "stop"},
            output_token_logprobs=[(-0.1, 5, None), (-0.2, 6, None)],
            output_top_logprobs=top,
        )
    )
    assert [(lp.token_id, lp.logprob, lp.top) for lp in first.logprobs] == [
        (5, -0.1, [(5, -0.1), (9, -2.0)])
    ]
    assert [(lp.token_id, lp.logprob, lp.top) for lp in second.logprobs] == [
        (6, -0.2, [(6, -0.2), (1, -3.0)])
    ]


def test_finish_reasons() -> None:
    assert finish_reason(None) == (None, None)
    assert finish_reason({"type": "stop", "matched": 2}) == (FINISH_STOP, None)
    assert finish_reason({"type": "length", "length": 9}) == (FINISH_LENGTH, None)
    assert finish_reason({"type": "abort"}, aborted=True) == (FINISH_CANCELLED, None)
    reason, error = finish_reason({"type": "abort", "message": "input is too long"})
    assert reason == FINISH_ERROR and error == "sglang: input is too long"


# --- the engine around SGLang's stream ----------------------------------------------------
class ScriptedSGLang:
    """Stands in for ``sglang.Engine`` at its one call (``async_generate``, whose stream is
    SGLang's cumulative chunks) and the abort that goes with it; a real run needs a GPU."""

    def __init__(self, chunks: list[dict[str, Any]], fail: Exception | None = None) -> None:
        self.chunks = chunks
        self.fail = fail
        self.calls: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.closed_streams = 0
        self.tokenizer_manager = SimpleNamespace(
            abort_request=self._abort, event_loop=None, auto_create_handle_loop=self._start_loop
        )

    def _start_loop(self) -> None:
        """As SGLang's tokenizer manager: its loop on the running one, and SIGTERM taken."""
        loop = asyncio.get_running_loop()
        self.tokenizer_manager.event_loop = loop
        loop.add_signal_handler(signal.SIGTERM, lambda: None)

    def _abort(self, rid: str) -> None:
        self.aborted.append(rid)

    async def async_generate(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(kwargs)

        async def stream() -> AsyncIterator[dict[str, Any]]:
            try:
                for c in self.chunks:
                    await asyncio.sleep(0)
                    yield c
                if self.fail is not None:
                    raise self.fail
                await asyncio.sleep(3600)  # a request that would go on
            finally:
                self.closed_streams += 1

        return stream()


async def collect(engine: SGLangEngine, req: PreprocessedRequest) -> list[Any]:
    return [out async for out in engine.generate(req)]


def test_generate_streams_deltas_to_the_finish() -> None:
    sgl = ScriptedSGLang([chunk([5], cached=8), chunk([5, 6, 2], {"type": "stop", "matched": 2})])
    engine = SGLangEngine(sgl)
    outs = asyncio.run(collect(engine, FULL))
    assert [o.token_ids for o in outs] == [[5], [6, 2]]
    assert outs[0].cached_tokens == 8 and outs[-1].finish_reason == FINISH_STOP
    call = sgl.calls[0]
    assert call["input_ids"] == [1, 2, 3] and call["sampling_params"] == sampling_params(FULL)
    assert call["rid"].startswith("req-1-") and not sgl.aborted
    assert engine.load().in_flight == 0


def test_sglang_does_not_take_sigterm_over() -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        sgl = ScriptedSGLang([chunk([5], {"type": "stop"})])
        asyncio.run(collect(SGLangEngine(sgl), request()))
        assert sgl.tokenizer_manager.event_loop is not None  # SGLang's loop was started
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_consumer_cancel_aborts_by_rid() -> None:
    sgl = ScriptedSGLang([chunk([5]), chunk([5, 6])])
    engine = SGLangEngine(sgl)

    async def run() -> None:
        stream = engine.generate(request())
        first = await stream.__anext__()
        assert first.token_ids == [5]
        assert engine.load().in_flight == 1
        await stream.aclose()

    asyncio.run(run())
    assert sgl.aborted == [sgl.calls[0]["rid"]]
    assert sgl.closed_streams == 1 and engine.load().in_flight == 0


def test_task_cancellation_aborts_too() -> None:
    sgl = ScriptedSGLang([chunk([5])])
    engine = SGLangEngine(sgl)

    async def run() -> None:
        async def consume() -> None:
            async for _ in engine.generate(request()):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert sgl.aborted == [sgl.calls[0]["rid"]]


def test_engine_exception_is_an_error_output() -> None:
    sgl = ScriptedSGLang(
        [chunk([5])],
        fail=ValueError(
            "The input (9000 tokens) is longer than the model's context length (8192 tokens)."
        ),
    )
    outs = asyncio.run(collect(SGLangEngine(sgl), request()))
    assert outs[-1].finish_reason == FINISH_ERROR
    assert outs[-1].error.startswith("sglang: The input (9000 tokens) is longer")
    assert not sgl.aborted  # it ended; nothing to abort


def test_abort_from_sglang_is_an_error() -> None:
    sgl = ScriptedSGLang([chunk([], {"type": "abort", "message": "scheduler is shutting down"})])
    outs = asyncio.run(collect(SGLangEngine(sgl), request()))
    assert outs[-1].finish_reason == FINISH_ERROR and "shutting down" in outs[-1].error


# --- KV events ----------------------------------------------------------------------------
def stored(hashes: list[int], parent: int | None, tokens: list[int], bs: int = 4) -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": bs,
        "lora_id": None,
    }


def test_stored_blocks_get_our_chained_hashes() -> None:
    got: list[KvCacheEvent] = []
    t = KvEventTranslator(4)
    t.set_sink(got.append)
    tokens = list(range(100, 112))
    t.handle(stored([901, 902], None, tokens[:8]))
    t.handle(stored([903], 902, tokens[8:12]))
    ours = block_hashes(tokens, 4)
    assert [(e.kind, e.block_hashes, e.parent_hash) for e in got] == [
        (KV_STORED, ours[:2], None),
        (KV_STORED, ours[2:], ours[1]),
    ]
    t.handle({"type": "BlockRemoved", "block_hashes": [903, 777]})
    assert (got[-1].kind, got[-1].block_hashes) == (KV_REMOVED, ours[2:])
    t.handle({"type": "AllBlocksCleared"})
    assert got[-1].kind == KV_CLEARED and t.held == 0


def test_only_gpu_tier_events_count() -> None:
    got: list[KvCacheEvent] = []
    t = KvEventTranslator(4)
    t.set_sink(got.append)
    t.handle({**stored([1], None, [1, 2, 3, 4]), "medium": "CPU_PINNED"})
    assert got == []
    t.handle({**stored([1], None, [1, 2, 3, 4]), "medium": "GPU"})
    assert len(got) == 1
    t.handle({"type": "BlockRemoved", "block_hashes": [1], "medium": "CPU_PINNED"})
    assert len(got) == 1 and t.held == 1


def test_partial_and_orphan_blocks_are_skipped() -> None:
    got: list[KvCacheEvent] = []
    t = KvEventTranslator(4)
    t.set_sink(got.append)
    t.handle(stored([1, 2], None, [1, 2, 3, 4, 5, 6]))  # second block partial
    assert got[-1].block_hashes == block_hashes([1, 2, 3, 4], 4) and t.held == 1
    t.handle(stored([9], 12345, [1, 2, 3, 4]))  # parent never seen (we joined late)
    assert len(got) == 1 and t.skipped == 1


def test_same_tokens_twice_are_counted() -> None:
    got: list[KvCacheEvent] = []
    t = KvEventTranslator(4)
    t.set_sink(got.append)
    t.handle(stored([1], None, [1, 2, 3, 4]))
    t.handle(stored([2], None, [1, 2, 3, 4]))  # another SGLang hash (a cache salt), same tokens
    assert len(got) == 1
    t.handle({"type": "BlockRemoved", "block_hashes": [1]})
    assert len(got) == 1  # still held through SGLang's block 2
    t.handle({"type": "BlockRemoved", "block_hashes": [2]})
    assert got[-1].kind == KV_REMOVED


def test_new_sink_hears_what_is_held_and_old_hears_cleared() -> None:
    t = KvEventTranslator(4)
    t.handle(stored([1, 2], None, list(range(8))))
    first: list[KvCacheEvent] = []
    t.set_sink(first.append)
    ours = block_hashes(list(range(8)), 4)
    assert [(e.block_hashes, e.parent_hash) for e in first] == [
        ([ours[0]], None),
        ([ours[1]], ours[0]),
    ]
    second: list[KvCacheEvent] = []
    t.set_sink(second.append)
    assert first[-1].kind == KV_CLEARED and len(second) == 2


def test_decode_batch_map_and_array_forms() -> None:
    maps = msgspec.msgpack.encode([1.0, [stored([1], None, [1, 2, 3, 4])], 0])
    assert decode_batch(maps)[0]["block_hashes"] == [1]
    arrays = msgspec.msgpack.encode([1.0, [["BlockRemoved", [1, 2]], ["AllBlocksCleared"]], None])
    assert decode_batch(arrays) == [
        {"type": "BlockRemoved", "block_hashes": [1, 2]},
        {"type": "AllBlocksCleared"},
    ]


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sglang_publisher_reaches_our_subscriber(server_args_cls: Any) -> None:
    """SGLang's own ZMQ publisher and event classes (what its scheduler runs) connect to
    our subscriber; the sink gets our hashes."""
    from sglang.srt.disaggregation.kv_events import (
        BlockRemoved,
        BlockStored,
        KVEventBatch,
        ZmqEventPublisher,
    )

    got: list[KvCacheEvent] = []
    translator = KvEventTranslator(4)
    translator.set_sink(got.append)
    sub = ZmqKvSubscriber(translator)
    pub = ZmqEventPublisher(attn_dp_rank=0, endpoint=sub.endpoint, topic="kv-events")
    try:
        tokens = list(range(8))
        store = BlockStored(
            block_hashes=[11, 12],
            parent_block_hash=None,
            token_ids=tokens,
            block_size=4,
            lora_id=None,
        )
        # A PUB socket drops what it sends before the subscription arrives: resend until heard.
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline, "no event reached the subscriber"
            pub.publish(KVEventBatch(ts=time.time(), events=[store]))
            time.sleep(0.1)
        pub.publish(KVEventBatch(ts=time.time(), events=[BlockRemoved(block_hashes=[12])]))
        wait_for(lambda: got[-1].kind == KV_REMOVED)
    finally:
        pub.shutdown()
        sub.close()
    ours = block_hashes(list(range(8)), 4)
    assert got[0].block_hashes == ours and got[-1].block_hashes == [ours[1]]


def test_subscriber_over_zmq_without_sglang() -> None:
    zmq = pytest.importorskip("zmq")
    got: list[KvCacheEvent] = []
    translator = KvEventTranslator(4)
    translator.set_sink(got.append)
    sub = ZmqKvSubscriber(translator)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(sub.endpoint)
    try:
        payload = msgspec.msgpack.encode([0.0, [stored([1], None, [1, 2, 3, 4])], 0])
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline, "no event reached the subscriber"
            pub.send_multipart([b"kv-events", (0).to_bytes(8, "big"), payload])
            time.sleep(0.05)
    finally:
        pub.close(linger=0)
        ctx.term()
        sub.close()
    assert got[0].block_hashes == block_hashes([1, 2, 3, 4], 4)


@pytest.mark.slow
@pytest.mark.skipif(has_nvidia_gpu(), reason="this machine has a GPU: SGLang would start")
def test_real_sglang_launch_failure_is_one_line(server_args_cls: Any, tmp_path: Path) -> None:
    """The real ``sglang.Engine`` launch, from a worker thread as dynamo-run starts engines,
    fails here (no accelerator): one EngineError line naming the cause and the log, and
    the process lives on. Runs in a child process: SGLang sets process-wide state."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code = (
        "import asyncio, sys\n"
        "from types import SimpleNamespace\n"
        "from pathlib import Path\n"
        "import dynamo_run_sglang\n"
        "from dynamo_run.engine import EngineConfig, EngineError\n"
        "from dynamo_run_sglang.engine import SGLangEngine\n"
        "dynamo_run_sglang.install.unusable_reason = lambda: None  # let it try\n"
        "card = SimpleNamespace(kind='hf', path=Path(sys.argv[1]), context_length=2048)\n"
        "async def main():\n"
        "    try:\n"
        "        await asyncio.to_thread(SGLangEngine.start, card, EngineConfig())\n"
        "    except EngineError as exc:\n"
        "        print('ERROR', exc)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
        "    print('alive')\n"
    )
    script = tmp_path / "launch.py"
    script.write_text(code)
    plugin = str(Path(dynamo_run_sglang.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([plugin, *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(script), str(model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[-1] == "alive", proc.stderr[-2000:]
    assert len(lines) == 2 and lines[0].startswith(f"ERROR sglang: cannot load '{model}': ")
    assert "(log: " in lines[0]


# --- end to end (needs a CUDA GPU) --------------------------------------------------------
def hf_model_folder() -> Path:
    folder = os.environ.get("DYN_TEST_HF_MODEL")
    if folder:
        return Path(folder)
    try:
        from hf_model import HfModelError, default_hf_folder
    except ImportError:
        pytest.skip("no HF model: set DYN_TEST_HF_MODEL to a Hugging Face model folder")
    try:
        return default_hf_folder()
    except HfModelError as exc:
        pytest.skip(f"cannot make the HF test model here: {exc}")


@pytest.mark.slow
def test_end_to_end_on_a_gpu() -> None:
    """The real engine on the default model's HF folder: greedy generation, the same answer
    twice with the prompt cached the second time, cancellation, json_object, KV events."""
    if unusable_reason() is not None:
        pytest.skip(f"needs a CUDA GPU with sglang installed: {unusable_reason()}")
    card = load_model_card(str(hf_model_folder()))
    engine = create_engine(card, EngineConfig(extra={"mem_fraction_static": 0.3}))
    events: list[KvCacheEvent] = []
    engine.set_kv_event_sink(events.append)
    prompt = card.tokenizer.encode("The capital of France is" * 8).ids
    greedy = PreprocessedRequest(
        request_id="e2e",
        token_ids=prompt,
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=12, stop_token_ids=card.stop_token_ids),
        logprobs=2,
    )

    async def run() -> None:
        try:
            first = await collect(engine, greedy)
            second = await collect(engine, greedy)
            tokens = [t for o in first for t in o.token_ids]
            assert tokens and tokens == [t for o in second for t in o.token_ids]
            assert first[-1].finish_reason in (FINISH_STOP, FINISH_LENGTH)
            assert sum(o.cached_tokens or 0 for o in second) > 0
            assert all(len(lp.top) == 2 for o in first for lp in o.logprobs or [])
            stream = engine.generate(
                PreprocessedRequest(
                    request_id="c", token_ids=prompt, stop=StopConditions(max_tokens=500)
                )
            )
            await stream.__anext__()
            await stream.aclose()
            assert engine.load().in_flight == 0
            js = await collect(
                engine,
                PreprocessedRequest(
                    request_id="j",
                    token_ids=prompt,
                    sampling=SamplingOptions(temperature=0.0, json_object=True),
                    stop=StopConditions(max_tokens=40),
                ),
            )
            text = card.tokenizer.decode([t for o in js for t in o.token_ids])
            assert text.lstrip().startswith("{")
            for _ in range(100):  # events come from SGLang's scheduler process over ZMQ
                if any(e.kind == KV_STORED for e in events):
                    break
                await asyncio.sleep(0.1)
            assert any(e.kind == KV_STORED for e in events)
            assert engine.load().kv_blocks_total > 0
        finally:
            await engine.close()

    asyncio.run(run())
