"""out=trtllm: argument passing, the sampling mapping, streamed deltas, finish reasons,
cancellation, load, KV events and the one-line errors.

TensorRT-LLM's wheels come only from NVIDIA's package index (PyPI holds a placeholder that
downloads from there), so on machines without that index the tests that need its classes
(``SamplingParams``, ``KvCacheConfig``) skip and the pure mapping is still tested.
Generation needs a CUDA GPU: here the engine's one call into TensorRT-LLM
(``LLM.generate_async``, whose result streams and aborts, plus the stats and KV event
polls) is replaced by objects shaped like TensorRT-LLM's, and the real end-to-end test at
the bottom skips unless a GPU is present.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

try:
    import dynamo_run_trtllm
except ImportError:  # the plugin is not installed in this environment: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engines" / "trtllm"))
    import dynamo_run_trtllm

from dynamo_run_trtllm import create_engine, unusable_reason
from dynamo_run_trtllm.config import EVENT_BUFFER, block_size, context_length, llm_kwargs
from dynamo_run_trtllm.engine import LOG_WRAPPERS, TrtLlmEngine
from dynamo_run_trtllm.kv_events import KvEventTranslator
from dynamo_run_trtllm.sampling import sampling_kwargs
from dynamo_run_trtllm.stream import OutputStream, finish_reason, token_logprob

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

NO_TRTLLM = "tensorrt-llm is not installed here (its wheels come only from NVIDIA's package index)"
INSTALLED = importlib.util.find_spec("tensorrt_llm") is not None


def hf_card(path: str = "/models/llama", context: int = 4096) -> Any:
    """The fields of a Hugging Face model card that argument passing reads."""
    return SimpleNamespace(kind="hf", path=Path(path), context_length=context)


def request(**kw: Any) -> PreprocessedRequest:
    return PreprocessedRequest(request_id="req-1", token_ids=[1, 2, 3], **kw)


# --- machine and model checks -------------------------------------------------------------
def test_unusable_reason_here_is_one_line() -> None:
    reason = unusable_reason()
    if has_nvidia_gpu() and INSTALLED:
        assert reason is None
        return
    assert reason is not None and "\n" not in reason
    if not INSTALLED:
        assert reason.startswith("tensorrt-llm is not installed: pip install 'dynamo-run[trtllm]'")
    else:
        assert reason == "no NVIDIA GPU found (trtllm needs CUDA)"


def test_unusable_reason_hidden_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dynamo_run_trtllm.install.importlib.util, "find_spec", lambda name: object()
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert unusable_reason() == "no NVIDIA GPU found (trtllm needs CUDA)"


def test_gguf_model_is_one_line_error() -> None:
    card = load_model_card(None)  # the default model: a GGUF file
    with pytest.raises(EngineError) as err:
        create_engine(card, EngineConfig())
    text = str(err.value)
    assert "\n" not in text and "GGUF" in text and "out=llamacpp" in text


@pytest.mark.skipif(has_nvidia_gpu() and INSTALLED, reason="trtllm can run here")
def test_unusable_machine_is_one_line_error() -> None:
    with pytest.raises(EngineError) as err:
        create_engine(hf_card(), EngineConfig())
    assert str(err.value) == unusable_reason()


def test_bad_flag_reported_before_the_machine() -> None:
    with pytest.raises(EngineError, match="'--kv-cache-block-size' must be a positive integer"):
        create_engine(hf_card(), EngineConfig(kv_cache_block_size=0))


def test_root_cause_and_the_one_line_error(tmp_path: Path) -> None:
    log_file = tmp_path / "trtllm.log"
    log_file.write_text(
        "[TensorRT-LLM][WARNING] something harmless\n"
        "Traceback (most recent call last):\n"
        "ValueError: Unsupported model architecture: FooForCausalLM\n"
        "RuntimeError: Executor creation failed due to worker errors\n"
    )
    cause = root_cause(log_file, LOG_WRAPPERS)
    assert cause == "ValueError: Unsupported model architecture: FooForCausalLM"
    err = load_error("trtllm", "/m", RuntimeError("Executor creation failed"), cause, log_file)
    assert str(err) == (
        f"trtllm: cannot load '/m': ValueError: Unsupported model architecture: "
        f"FooForCausalLM (log: {log_file})"
    )
    oom = load_error("trtllm", "/m", RuntimeError("[TensorRT-LLM][ERROR] CUDA_ERROR_OUT_OF_MEMORY"))
    assert str(oom).startswith("trtllm: out of GPU memory loading '/m'")


# --- argument passing ---------------------------------------------------------------------
def test_llm_kwargs_defaults() -> None:
    kwargs = llm_kwargs(hf_card(), EngineConfig())
    assert kwargs == {
        "model": "/models/llama",
        "kv_cache_config": {
            "tokens_per_block": 32,  # TensorRT-LLM's default
            "enable_block_reuse": True,
            "event_buffer_max_size": EVENT_BUFFER,
        },
        "guided_decoding_backend": "xgrammar",
        "enable_iter_perf_stats": True,
    }
    assert block_size(kwargs) == 32 and context_length(hf_card(), kwargs) == 4096


def test_llm_kwargs_pass_the_flags_through() -> None:
    config = EngineConfig(
        context_length=2048,
        kv_cache_block_size=32,
        extra={"max_batch_size": 8, "kv_cache_config": {"free_gpu_memory_fraction": 0.5}},
    )
    config.tensor_parallel_size = 2
    kwargs = llm_kwargs(hf_card(), config)
    assert kwargs["max_seq_len"] == 2048 and context_length(hf_card(), kwargs) == 2048
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_batch_size"] == 8
    assert kwargs["kv_cache_config"]["tokens_per_block"] == 32
    assert kwargs["kv_cache_config"]["free_gpu_memory_fraction"] == 0.5  # merged, not replaced
    assert kwargs["kv_cache_config"]["enable_block_reuse"] is True


def test_extra_engine_args_win() -> None:
    config = EngineConfig(
        kv_cache_block_size=32,
        extra={"kv_cache_config": {"tokens_per_block": 64}, "guided_decoding_backend": None},
    )
    kwargs = llm_kwargs(hf_card(), config)
    assert block_size(kwargs) == 64 and kwargs["guided_decoding_backend"] is None


def test_bad_engine_args() -> None:
    with pytest.raises(EngineError, match="as MODEL"):
        llm_kwargs(hf_card(), EngineConfig(extra={"model": "/elsewhere"}))
    with pytest.raises(EngineError, match="'kv_cache_config' must be an object"):
        llm_kwargs(hf_card(), EngineConfig(extra={"kv_cache_config": 5}))


@pytest.fixture(scope="module")
def trtllm() -> Any:
    return pytest.importorskip("tensorrt_llm", reason=NO_TRTLLM)


def test_kv_cache_config_is_trtllm_s(trtllm: Any) -> None:
    from tensorrt_llm.llmapi import KvCacheConfig

    config = EngineConfig(kv_cache_block_size=32)
    kv = KvCacheConfig(**llm_kwargs(hf_card(), config)["kv_cache_config"])
    assert (kv.tokens_per_block, kv.enable_block_reuse, kv.event_buffer_max_size) == (
        32,
        True,
        EVENT_BUFFER,
    )


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
    assert sampling_kwargs(FULL, 4096) == {
        "max_tokens": 64,
        "detokenize": False,
        "return_perf_metrics": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 1234,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "stop_token_ids": [2, 7],
        "min_tokens": 3,
        "logprobs": 5,
        "guided_decoding": {"json": FULL.sampling.json_schema},
    }


def test_sampling_special_cases() -> None:
    params = sampling_kwargs(
        request(
            sampling=SamplingOptions(top_k=-1, json_object=True),
            stop=StopConditions(stop_token_ids=[2], ignore_eos=True),
            logprobs=0,
        ),
        context_length=100,
    )
    assert params["max_tokens"] == 97  # no limit given: the rest of the context, not 32
    assert params["top_k"] == 0  # the whole vocabulary
    assert params["ignore_eos"] is True and "stop_token_ids" not in params
    assert params["logprobs"] == 1  # the chosen token's logprob needs 1
    assert params["guided_decoding"] == {"json_object": True}


def test_sampling_is_valid_for_trtllm(trtllm: Any) -> None:
    from tensorrt_llm import SamplingParams
    from tensorrt_llm.sampling_params import GuidedDecodingParams

    kwargs = sampling_kwargs(FULL, 4096)
    guide = GuidedDecodingParams(**kwargs.pop("guided_decoding"))
    sp = SamplingParams(guided_decoding=guide, **kwargs)
    assert (sp.max_tokens, sp.top_k, sp.seed, sp.min_tokens, sp.logprobs) == (64, 40, 1234, 3, 5)
    assert sp.stop_token_ids == [2, 7] and sp.guided_decoding.json == FULL.sampling.json_schema


# --- streamed output ----------------------------------------------------------------------
def step(
    ids: list[int],
    finish: str | None = None,
    logprobs: Any = None,
    reused: int | None = None,
    done: bool = False,
) -> Any:
    """A RequestOutput as TensorRT-LLM streams it: cumulative token ids."""
    metrics = None
    if reused is not None:
        metrics = SimpleNamespace(kv_cache_metrics=SimpleNamespace(num_reused_blocks=reused))
    completion = SimpleNamespace(
        token_ids=ids, logprobs=logprobs or [], finish_reason=finish, request_perf_metrics=metrics
    )
    return SimpleNamespace(outputs=[completion], finished=done or finish is not None)


def test_cumulative_steps_become_deltas() -> None:
    s = OutputStream(prompt_len=40, block_size=16)
    outs = [
        s.step(step([5], reused=2)),
        s.step(step([5, 6, 7], reused=2)),
        s.step(step([5, 6, 7, 8], "length")),
    ]
    assert [o.token_ids for o in outs] == [[5], [6, 7], [8]]
    assert [o.cached_tokens for o in outs] == [32, None, None]
    assert [o.finish_reason for o in outs] == [None, None, FINISH_LENGTH]


def test_trimmed_stop_token_is_not_a_negative_delta() -> None:
    s = OutputStream(prompt_len=3, block_size=16)
    s.step(step([5, 6]))
    last = s.step(step([5, 6], "stop"))  # the stop token came and was trimmed
    assert last.token_ids == [] and last.finish_reason == FINISH_STOP


def test_cached_tokens_never_exceed_the_prompt() -> None:
    s = OutputStream(prompt_len=20, block_size=16)
    assert s.step(step([5], reused=2)).cached_tokens == 20


def test_logprobs_dicts_and_floats() -> None:
    Logprob = SimpleNamespace
    entry = {
        5: Logprob(logprob=-0.1, rank=1),
        9: Logprob(logprob=-2.0, rank=2),
        1: Logprob(logprob=-3.0, rank=3),
    }
    lp = token_logprob(5, entry, 2)
    assert (lp.token_id, lp.logprob, lp.top) == (5, -0.1, [(5, -0.1), (9, -2.0)])
    assert token_logprob(9, entry, 0).top == [] and token_logprob(9, entry, 0).logprob == -2.0
    assert token_logprob(7, -0.5, 3).logprob == -0.5
    assert math.isnan(token_logprob(4, entry, 1).logprob)
    s = OutputStream(prompt_len=3, block_size=16, logprobs=1)
    s.step(step([5], logprobs=[entry]))
    out = s.step(step([5, 9], "stop", logprobs=[entry, {9: Logprob(logprob=-0.3, rank=1)}]))
    assert [(x.token_id, x.logprob, x.top) for x in out.logprobs] == [(9, -0.3, [(9, -0.3)])]


def test_finish_reasons() -> None:
    assert finish_reason(None, finished=False) == (None, None)
    assert finish_reason(None, finished=True) == (FINISH_STOP, None)
    assert finish_reason("stop", True) == (FINISH_STOP, None)
    assert finish_reason("length", True) == (FINISH_LENGTH, None)
    assert finish_reason("cancelled", True) == (FINISH_CANCELLED, None)
    assert finish_reason("timeout", True) == (FINISH_ERROR, "trtllm: the request timed out")


# --- the engine around TensorRT-LLM's result ----------------------------------------------
class ScriptedResult:
    """Shaped like TensorRT-LLM's streaming RequestOutput: an async iterator that updates
    and returns itself each step, and ``abort()``."""

    def __init__(self, steps: list[Any], fail: Exception | None) -> None:
        self.steps = steps
        self.fail = fail
        self.aborted = False
        self.outputs: list[Any] = []
        self.finished = False

    def __aiter__(self) -> ScriptedResult:
        return self

    async def __anext__(self) -> ScriptedResult:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        if not self.steps:
            if self.fail is not None:
                raise self.fail
            await asyncio.sleep(3600)  # a request that would go on
        nxt = self.steps.pop(0)
        self.outputs, self.finished = nxt.outputs, nxt.finished
        return self

    def abort(self) -> None:
        self.aborted = True


class ScriptedLLM:
    """Stands in for ``tensorrt_llm.LLM`` at its one call (``generate_async``) and the
    stats / KV events polls; a real run needs a GPU."""

    def __init__(self, steps: list[Any], fail: Exception | None = None) -> None:
        self.steps = steps
        self.fail = fail
        self.calls: list[tuple[list[int], Any, bool]] = []
        self.results: list[ScriptedResult] = []
        self.stats: list[dict[str, Any]] = []
        self.kv_events: list[dict[str, Any]] = []
        self.shut = False

    def generate_async(
        self, ids: list[int], sampling_params: Any, streaming: bool
    ) -> ScriptedResult:
        self.calls.append((ids, sampling_params, streaming))
        self.results.append(ScriptedResult(list(self.steps), self.fail))
        return self.results[-1]

    def _drain(self, items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            while items:
                yield items.pop(0)

        return gen()

    def get_stats_async(self, timeout: float) -> AsyncIterator[dict[str, Any]]:
        return self._drain(self.stats)

    def get_kv_cache_events_async(self, timeout: float) -> AsyncIterator[dict[str, Any]]:
        return self._drain(self.kv_events)

    def shutdown(self) -> None:
        self.shut = True


def make_engine(llm: ScriptedLLM) -> TrtLlmEngine:
    return TrtLlmEngine(llm, lambda kwargs: kwargs, block_size=16, context_length=4096)


async def collect(engine: TrtLlmEngine, req: PreprocessedRequest) -> list[Any]:
    return [out async for out in engine.generate(req)]


def test_generate_streams_deltas_to_the_finish() -> None:
    llm = ScriptedLLM([step([5], reused=1), step([5, 6, 2], "stop")])
    engine = make_engine(llm)

    async def run() -> list[Any]:
        try:
            return await collect(engine, FULL)
        finally:
            await engine.close()

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [[5], [6, 2]]
    assert outs[0].cached_tokens == 3 and outs[-1].finish_reason == FINISH_STOP
    ids, params, streaming = llm.calls[0]
    assert ids == [1, 2, 3] and streaming is True and params == sampling_kwargs(FULL, 4096)
    assert not llm.results[0].aborted and llm.shut


def test_consumer_cancel_aborts_the_result() -> None:
    llm = ScriptedLLM([step([5])])
    engine = make_engine(llm)

    async def run() -> None:
        stream = engine.generate(request())
        assert (await stream.__anext__()).token_ids == [5]
        assert engine.load().in_flight == 1
        await stream.aclose()
        await engine.close()

    asyncio.run(run())
    assert llm.results[0].aborted and engine.load().in_flight == 0


def test_engine_exception_is_an_error_output() -> None:
    llm = ScriptedLLM([step([5])], fail=RuntimeError("Executor error: prompt too long"))
    engine = make_engine(llm)
    outs = asyncio.run(collect(engine, request()))
    assert outs[-1].finish_reason == FINISH_ERROR
    assert outs[-1].error == "trtllm: Executor error: prompt too long"
    assert not llm.results[0].aborted


def test_bad_sampling_value_is_an_error_output() -> None:
    def reject(kwargs: dict[str, Any]) -> Any:
        raise ValueError("best_of (1) cannot be less than n (2)")

    engine = TrtLlmEngine(ScriptedLLM([]), reject)
    outs = asyncio.run(collect(engine, request()))
    assert [(o.finish_reason, o.error) for o in outs] == [
        (FINISH_ERROR, "trtllm: best_of (1) cannot be less than n (2)")
    ]


def test_load_and_kv_events_from_the_polls() -> None:
    llm = ScriptedLLM([step([5], "length")])
    llm.stats.append(
        {
            "numActiveRequests": 3,
            "maxNumActiveRequests": 64,
            "kvCacheStats": {"maxNumBlocks": 1000, "usedNumBlocks": 120, "tokensPerBlock": 16},
        }
    )
    tokens = list(range(32))
    llm.kv_events.append(
        {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [1000, 0]}}
    )
    llm.kv_events.append(
        {
            "event_id": 1,
            "data": {
                "type": "stored",
                "parent_hash": None,
                "blocks": [
                    {
                        "type": "stored_block",
                        "block_hash": 77,
                        "tokens": [
                            {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                            for t in tokens[:16]
                        ],
                    },
                    {
                        "type": "stored_block",
                        "block_hash": 78,
                        "tokens": [
                            {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                            for t in tokens[16:]
                        ],
                    },
                ],
            },
        }
    )
    llm.kv_events.append({"event_id": 2, "data": {"type": "removed", "block_hashes": [78]}})
    engine = make_engine(llm)
    got: list[KvCacheEvent] = []

    async def run() -> None:
        engine.set_kv_event_sink(got.append)
        await collect(engine, request())
        for _ in range(100):
            if len(got) >= 2 and engine.load().slots_busy:
                break
            await asyncio.sleep(0.01)
        await engine.close()

    asyncio.run(run())
    load = engine.load()
    assert (load.slots_busy, load.slots_total, load.kv_blocks_total, load.kv_blocks_used) == (
        3,
        64,
        1000,
        120,
    )
    ours = block_hashes(tokens, 16)
    assert [(e.kind, e.block_hashes, e.parent_hash) for e in got] == [
        (KV_STORED, ours, None),
        (KV_REMOVED, [ours[1]], None),
        (KV_CLEARED, [], None),  # closing: everything it held is gone
    ]


# --- KV event translation -----------------------------------------------------------------
def stored(parent: Any, *blocks: tuple[int, list[int]]) -> dict[str, Any]:
    return {
        "data": {
            "type": "stored",
            "parent_hash": parent,
            "blocks": [
                {"block_hash": h, "tokens": [{"token_id": t} for t in toks]} for h, toks in blocks
            ],
        }
    }


def test_translator_chains_and_counts() -> None:
    got: list[KvCacheEvent] = []
    t = KvEventTranslator(4)
    t.set_sink(got.append)
    t.handle(stored(None, (1, [1, 2, 3, 4])))
    t.handle(stored(1, (2, [5, 6, 7, 8]), (3, [9, 10])))  # partial block: not shared
    ours = block_hashes(list(range(1, 9)), 4)
    assert [(e.block_hashes, e.parent_hash) for e in got] == [
        ([ours[0]], None),
        ([ours[1]], ours[0]),
    ]
    t.handle(stored(999, (4, [1, 1, 1, 1])))  # parent never seen
    assert t.skipped == 1 and t.held == 2
    t.handle(stored(None, (5, [1, 2, 3, 4])))  # their other hash of the same tokens
    assert len(got) == 2
    t.handle({"data": {"type": "removed", "block_hashes": [1]}})
    assert len(got) == 2  # still held through block 5
    t.handle({"data": {"type": "removed", "block_hashes": [5, 2]}})
    assert got[-1].kind == KV_REMOVED and sorted(got[-1].block_hashes) == sorted(ours)
    replay: list[KvCacheEvent] = []
    t.handle(stored(None, (6, [1, 2, 3, 4])))
    t.set_sink(replay.append)
    assert got[-1].kind == KV_CLEARED and replay[0].block_hashes == [ours[0]]


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
        pytest.skip(f"needs a CUDA GPU with tensorrt-llm installed: {unusable_reason()}")
    card = load_model_card(str(hf_model_folder()))
    engine = create_engine(
        card, EngineConfig(extra={"kv_cache_config": {"free_gpu_memory_fraction": 0.3}})
    )
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
            for _ in range(100):
                if any(e.kind == KV_STORED for e in events):
                    break
                await asyncio.sleep(0.1)
            assert any(e.kind == KV_STORED for e in events)
        finally:
            await engine.close()

    asyncio.run(run())
