"""The gRPC service in-process, for states a live process cannot be held in on demand (the
model still loading, a failed load, an engine that fails mid-request), driven by the real
asyncio Triton client; and the pure parts: tensors, request decoding, the spec."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as tca
from conftest import free_port
from test_http_app import FailingEngine
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from dynamo_run.echo import EchoEngine
from dynamo_run.inputs.grpc.proto import grpc_service_pb2 as pb
from dynamo_run.inputs.grpc.request import parse_infer_request
from dynamo_run.inputs.grpc.server import start_grpc
from dynamo_run.inputs.grpc.tensors import TensorError, bytes_raw, decode_inputs
from dynamo_run.model.card import ModelCard, load_model_card
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.pipeline.serving import ServedModels
from dynamo_run.spec import Flags, SpecError, parse_run_spec


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_model_card(None)


def _text(value: str, name: str = "text_input") -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return tensor


async def _serve(loading: asyncio.Task[Any]) -> tuple[Any, tca.InferenceServerClient]:
    spec = parse_run_spec(["in=grpc", "out=echo"], Flags(grpc_port=free_port()))
    server, port = await start_grpc(ServedModels(loading), spec)
    return server, tca.InferenceServerClient(f"127.0.0.1:{port}")


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_unavailable_while_loading_then_ready(card: ModelCard) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        async def load() -> ModelClient:
            await gate.wait()
            return ModelClient(card, EchoEngine(0))

        loading = asyncio.create_task(load())
        server, client = await _serve(loading)
        try:
            assert await client.is_server_live()
            assert not await client.is_server_ready()
            assert not await client.is_model_ready(card.name)
            for call in (
                client.infer(card.name, [_text("hi")]),
                client.get_model_metadata(card.name),
            ):
                with pytest.raises(InferenceServerException) as info:
                    await call
                assert _code(info.value) == "StatusCode.UNAVAILABLE"
                assert "loading" in info.value.message()
            gate.set()
            await loading
            assert await client.is_server_ready()
            assert await client.is_model_ready(card.name)
            result = await client.infer(card.name, [_text("hi")], parameters={"max_tokens": 8})
            assert result.as_numpy("text_output").tolist() == [b"hihi"]
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_unavailable_after_a_failed_load() -> None:
    async def scenario() -> None:
        async def load() -> ModelClient:
            raise OSError("disk on fire")

        loading = asyncio.create_task(load())
        await asyncio.gather(loading, return_exceptions=True)
        server, client = await _serve(loading)
        try:
            assert not await client.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                await client.infer("any", [_text("hi")])
            assert _code(info.value) == "StatusCode.UNAVAILABLE"
            assert "failed to load" in info.value.message()
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.parametrize("crash", [False, True])
def test_engine_failure_is_internal_never_a_crash(card: ModelCard, crash: bool) -> None:
    async def scenario() -> None:
        async def load() -> ModelClient:
            return ModelClient(card, FailingEngine(crash=crash))

        loading = asyncio.create_task(load())
        await loading
        server, client = await _serve(loading)
        try:
            with pytest.raises(InferenceServerException) as info:
                await client.infer(card.name, [_text("hello there")])
            assert _code(info.value) == "StatusCode.INTERNAL"
            expected = "internal server error" if crash else "out of KV cache"
            assert expected in info.value.message()

            async def requests() -> AsyncIterator[dict[str, Any]]:
                for _ in range(2):
                    stream = InferInput("stream", [1], "BOOL")
                    stream.set_data_from_numpy(np.array([True]))
                    yield {"model_name": card.name, "inputs": [_text("hello there"), stream]}

            errors, texts = [], []
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    errors.append(str(error))
                else:
                    texts.append(result.as_numpy("text_output").tolist())
            # Each request's tokens before the failure, then its error; both requests ran.
            assert len(errors) == 2 and all(expected in e for e in errors)
            assert texts
            assert await client.is_server_live()
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())


# --- pure parts ------------------------------------------------------------------------------


def _request(**tensors: tuple[str, list[Any]]) -> pb.ModelInferRequest:
    """A request with raw tensors: name=(datatype, values)."""
    formats = {"BOOL": "?", "INT32": "i", "UINT64": "Q", "FP32": "f", "INT64": "q"}
    request = pb.ModelInferRequest(model_name="m")
    for name, (datatype, values) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        if datatype == "BYTES":
            request.raw_input_contents.append(bytes_raw(values))
        else:
            fmt = formats[datatype]
            request.raw_input_contents.append(struct.pack(f"<{len(values)}{fmt}", *values))
    return request


def test_decode_raw_and_typed_tensors() -> None:
    request = _request(text_input=("BYTES", [b"hi", b""]), n=("INT32", [1, -2]))
    tensors = decode_inputs(request)
    assert tensors["text_input"].values == [b"hi", b""]
    assert tensors["n"].values == [1, -2]
    typed = pb.ModelInferRequest()
    tensor = typed.inputs.add(name="t", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([0.5, 1.5])
    assert decode_inputs(typed)["t"].values == [0.5, 1.5]
    tensor.shape[:] = [3]
    with pytest.raises(TensorError, match=r"'t'.*3 elements but 2"):
        decode_inputs(typed)
    bad = pb.ModelInferRequest()
    bad.inputs.add(name="b", datatype="BYTES", shape=[1])
    bad.raw_input_contents.append(b"\x09\x00\x00\x00abc")
    with pytest.raises(TensorError, match=r"'b'.*ends inside"):
        decode_inputs(bad)
    odd = pb.ModelInferRequest()
    odd.inputs.add(name="x", datatype="COMPLEX", shape=[1])
    with pytest.raises(TensorError, match=r"'x'.*not supported"):
        decode_inputs(odd)


def test_parse_precedence_and_aliases() -> None:
    request = _request(
        text_input=("BYTES", [b"Hello"]),
        sampling_parameters=("BYTES", [json.dumps({"temperature": "0.3", "top_k": 7}).encode()]),
        temperature=("FP32", [0.5]),
        random_seed=("UINT64", [42]),
        stop_words=("BYTES", [b"x", b"y"]),
        stream=("BOOL", [True]),
        end_id=("INT32", [2]),
    )
    request.parameters["top_k"].int64_param = 3
    request.parameters["min_p"].double_param = 0.1
    request.parameters["sequence_id"].int64_param = 9  # tritonclient's, ignored
    parsed = parse_infer_request(request)
    assert parsed.prompt == "Hello" and parsed.stream
    assert parsed.fields == {
        "temperature": 0.5,  # tensor over JSON
        "top_k": 7,  # JSON over parameter
        "min_p": 0.1,
        "seed": 42,
        "stop": ["x", "y"],
    }
    assert parsed.sources["temperature"] == "input 'temperature'"
    assert not parsed.prepend_prompt()  # streaming: deltas only


def test_parse_errors_name_the_tensor() -> None:
    with pytest.raises(TensorError, match=r"'text_input'.*missing"):
        parse_infer_request(_request(max_tokens=("INT32", [3])))
    with pytest.raises(TensorError, match=r"'text_input'.*one element"):
        parse_infer_request(_request(text_input=("BYTES", [b"a", b"b"])))
    with pytest.raises(TensorError, match="'bad_words'"):
        parse_infer_request(_request(text_input=("BYTES", [b"a"]), bad_words=("BYTES", [b"x"])))
    with pytest.raises(TensorError, match=r"'stream'.*boolean"):
        parse_infer_request(_request(text_input=("BYTES", [b"a"]), stream=("INT64", [7])))
    request = _request(text_input=("BYTES", [b"a"]))
    request.outputs.add(name="logits")
    with pytest.raises(TensorError, match="unknown output 'logits'"):
        parse_infer_request(request)


def test_spec_inputs_and_ports() -> None:
    assert parse_run_spec(["in=grpc"], Flags()).input.kind == "grpc"
    for value in ("in=http,grpc", "in=grpc,http"):
        assert parse_run_spec([value], Flags()).input.kind == "http,grpc"
    assert Flags().grpc_port == 8001
    with pytest.raises(SpecError, match="only http and grpc"):
        parse_run_spec(["in=grpc,text"], Flags())
    with pytest.raises(SpecError, match="--grpc-port 0"):
        parse_run_spec(["in=grpc"], Flags(grpc_port=0))
    with pytest.raises(SpecError, match="both 9000"):
        parse_run_spec(["in=http,grpc"], Flags(http_port=9000, grpc_port=9000))


def test_hand_serialized_chunks_equal_protobufs(card: ModelCard) -> None:
    """``delta_bytes`` (the per-token path) decodes to the message protobuf would build."""
    from dynamo_run.inputs.grpc.service import _Answer

    request = _request(text_input=("BYTES", ["héllo".encode()]), stream=("BOOL", [True]))
    request.id = "req-7"
    parsed = parse_infer_request(request)
    parsed.exclude_input = False  # the first chunk carries the prompt too
    client = ModelClient(card, EchoEngine(0))
    for text in ("", "a", "ü" * 300):  # lengths needing one and two varint bytes
        fast = _Answer(request, client, parsed)
        slow = _Answer(request, client, parsed)
        got = pb.ModelStreamInferResponse.FromString(fast.delta_bytes(text))
        want = pb.ModelStreamInferResponse(infer_response=slow.response(text, None, True))
        assert got == want
        assert got.infer_response.raw_output_contents[0] == bytes_raw([f"héllo{text}".encode()])
        # Later chunks: the same head, without the prompt.
        assert pb.ModelStreamInferResponse.FromString(fast.delta_bytes(text)) == (
            pb.ModelStreamInferResponse(infer_response=slow.response(text, None, True))
        )
