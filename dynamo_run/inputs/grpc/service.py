"""The KServe v2 ``inference.GRPCInferenceService`` over the pipeline every input uses.

Every failure becomes a gRPC status with a one-line message (in ModelStreamInfer: an
``error_message`` response, and the stream goes on); nothing reaches the client as a
traceback. Cancelling a call (or a stream) closes the engine generators of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from dynamo_run import __version__
from dynamo_run.inputs.grpc.proto import grpc_service_pb2 as pb
from dynamo_run.inputs.grpc.proto import model_config_pb2 as mc
from dynamo_run.inputs.grpc.request import (
    FINISH_REASON,
    NUM_INPUT_TOKENS,
    NUM_OUTPUT_TOKENS,
    TEXT_INPUT,
    TEXT_OUTPUT,
    InferInput,
    parse_infer_request,
    prepare,
)
from dynamo_run.inputs.grpc.tensors import (
    TensorError,
    add_bytes_output,
    add_uint32_output,
    set_parameter,
)
from dynamo_run.metrics import FrontendMetrics
from dynamo_run.pipeline.client import Delta, EngineFailure, EngineUnavailable, ModelClient
from dynamo_run.pipeline.directory import ModelDirectory, SingleModel

log = logging.getLogger("dynamo_run.grpc")

SERVICE = "inference.GRPCInferenceService"
MODEL_VERSION = "1"
PLATFORM = "dynamo"
FINAL = "triton_final_response"  # response parameter tritonclient's streams look for
# Metrics labels (the `endpoint` label of dynamo_frontend_requests_total).
ENDPOINT_INFER = "model_infer"
ENDPOINT_STREAM = "model_stream_infer"

# (name, datatype, shape, optional) of the inputs and outputs every model reports.
INPUTS = (
    (TEXT_INPUT, "BYTES", [1], False),
    ("stream", "BOOL", [1], True),
    ("sampling_parameters", "BYTES", [1], True),
    ("exclude_input_in_output", "BOOL", [1], True),
    ("max_tokens", "INT32", [1], True),
    ("temperature", "FP32", [1], True),
    ("top_p", "FP32", [1], True),
    ("top_k", "INT32", [1], True),
    ("random_seed", "UINT64", [1], True),
    ("stop_words", "BYTES", [-1], True),
)
OUTPUTS = (
    (TEXT_OUTPUT, "BYTES", [-1]),
    (FINISH_REASON, "BYTES", [-1]),
    (NUM_INPUT_TOKENS, "UINT32", [1]),
    (NUM_OUTPUT_TOKENS, "UINT32", [1]),
)


class RpcError(Exception):
    """Ends an RPC with ``code`` and this message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrpcModels:
    """The models being served, seen from gRPC: UNAVAILABLE until loaded, then one local
    model or the directory of remote ones (``out=dyn``)."""

    def __init__(self, loading: asyncio.Task[Any], metrics: FrontendMetrics, watch: bool) -> None:
        self.loading = loading
        self.metrics = metrics
        self.watch = watch  # register the engine's gauges (False when HTTP already does)
        self.directory: ModelDirectory | None = None

    def loaded(self) -> ModelDirectory | None:
        if self.directory is None and self.loading.done():
            if self.loading.cancelled() or self.loading.exception() is not None:
                return None
            result = self.loading.result()
            if isinstance(result, ModelClient):
                self.directory = SingleModel(result)
                if self.watch:
                    self.metrics.watch_engine(result.card.name, result.engine)
            else:
                self.directory = result
                collector = getattr(result, "metrics_collector", None)
                if self.watch and collector is not None:
                    self.metrics.registry.register(collector())
        return self.directory

    def ready_directory(self) -> ModelDirectory:
        directory = self.loaded()
        if directory is None:
            if self.loading.done():
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "the model failed to load")
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the model is loading; retry shortly")
        return directory

    def client(self, name: str, version: str = "") -> ModelClient:
        directory = self.ready_directory()
        names = directory.names()
        if not name and len(names) == 1:
            name = names[0]
        if version not in ("", MODEL_VERSION):
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"model '{name}' has no version '{version}'; its only version is {MODEL_VERSION}",
            )
        client = directory.get(name) if name else None
        if client is not None:
            return client
        if directory.was_served(name) or (directory.where and not name and not names):
            # Its workers are gone (or none serves any model yet): one may come back.
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE,
                f"no live instance serves model '{name}' in {directory.where}",
            )
        served = ", ".join(f"'{n}'" for n in names) or "no model now"
        raise RpcError(
            grpc.StatusCode.NOT_FOUND,
            f"model '{name}' is not served here; this server serves {served}",
        )

    def model_name(self) -> str:
        directory = self.loaded()
        names = directory.names() if directory is not None else []
        return names[0] if len(names) == 1 else ""


def _tensor_metadata(name: str, datatype: str, shape: list[int]) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def _config_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _model_config(client: ModelClient) -> mc.ModelConfig:
    config = mc.ModelConfig(
        name=client.card.name,
        platform=PLATFORM,
        backend=PLATFORM,
        max_batch_size=0,
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
    )
    for name, datatype, shape, optional in INPUTS:
        config.input.add(name=name, data_type=_config_type(datatype), dims=shape, optional=optional)
    for name, datatype, shape in OUTPUTS:
        config.output.add(name=name, data_type=_config_type(datatype), dims=shape)
    config.parameters["engine"].string_value = client.engine_name
    config.parameters["context_length"].string_value = str(client.card.context_length)
    return config


def _status_of(exc: BaseException) -> RpcError:
    """The status an exception of the pipeline becomes."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, TensorError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, EngineUnavailable):
        return RpcError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, EngineFailure):
        log.error("engine failure: %s", exc)
        return RpcError(grpc.StatusCode.INTERNAL, f"the engine failed: {exc}")
    log.error("request failed: %s", exc, exc_info=exc)
    return RpcError(grpc.StatusCode.INTERNAL, "internal server error")


class _Answer:
    """Builds the responses of one request: text deltas, then the final response with the
    finish reason and token counts."""

    def __init__(
        self, request: pb.ModelInferRequest, client: ModelClient, parsed: InferInput
    ) -> None:
        self.model = client.card.name
        self.id = request.id
        self.outputs = parsed.outputs
        self.prefix = parsed.prompt if parsed.prepend_prompt() else ""
        self.head: bytes | None = None  # see delta_bytes

    def delta_bytes(self, text: str) -> bytes:
        """A streamed, non-final ModelStreamInferResponse carrying ``text``, serialized by
        hand: the per-token path. A serialized message followed by more fields is the
        message with those fields added, so the part that never changes (names, id, the
        output's metadata, the final flag) is serialized once per request and each chunk
        appends its raw_output_contents and wraps the result as infer_response."""
        if self.head is None:
            head = pb.ModelInferResponse(model_name=self.model, model_version=MODEL_VERSION)
            if self.id:
                head.id = self.id
            head.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
            set_parameter(head.parameters, FINAL, False)
            self.head = head.SerializeToString()
        if self.prefix:
            text, self.prefix = self.prefix + text, ""
        data = text.encode()
        element = _LENGTH.pack(len(data)) + data
        inner = self.head + _RAW_OUTPUT + _varint(len(element)) + element
        return _INFER_RESPONSE + _varint(len(inner)) + inner

    def response(self, text: str, last: Delta | None, streaming: bool) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=self.model, model_version=MODEL_VERSION)
        if self.id:
            response.id = self.id
        if self.prefix:
            text, self.prefix = self.prefix + text, ""
        if TEXT_OUTPUT in self.outputs:
            add_bytes_output(response, TEXT_OUTPUT, [text.encode()])
        if last is not None:
            for name in self.outputs:
                if name == FINISH_REASON:
                    add_bytes_output(response, name, [(last.finish_reason or "").encode()])
                elif name == NUM_INPUT_TOKENS:
                    add_uint32_output(response, name, last.prompt_tokens)
                elif name == NUM_OUTPUT_TOKENS:
                    add_uint32_output(response, name, last.completion_tokens)
        if streaming:
            set_parameter(response.parameters, FINAL, last is not None)
        return response


class InferenceService:
    """The RPC handlers. ``api_key``: required as call metadata (``authorization: Bearer
    KEY`` or ``x-api-key: KEY``) by every RPC except the health checks (ServerLive,
    ServerReady, ModelReady), as HTTP leaves /health open."""

    def __init__(
        self, models: GrpcModels, metrics: FrontendMetrics, api_key: str | None = None
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None

    # --- the service table -----------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        methods = {
            "ServerLive": unary(self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(
                self.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": unary(
                self.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelConfig": unary(self.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelInfer": unary(self.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=_serialize,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.api_key is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), self.api_key
                ):
                    return
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided.")
            if key == "x-api-key":
                if hmac.compare_digest(str(value).strip().encode(), self.api_key):
                    return
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided.")
        raise RpcError(
            grpc.StatusCode.UNAUTHENTICATED,
            "no API key; send it as metadata 'authorization: Bearer KEY' or 'x-api-key: KEY'",
        )

    # --- health and metadata ---------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.models.loaded() is not None)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        directory = self.models.loaded()
        ready = False
        if directory is not None and request.version in ("", MODEL_VERSION):
            ready = directory.get(request.name) is not None
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(context, lambda: pb.ServerMetadataResponse(
            name="dynamo-run", version=__version__, extensions=["model_configuration"]
        ))  # fmt: skip

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> Any:
            client = self.models.client(request.name, request.version)
            return pb.ModelMetadataResponse(
                name=client.card.name,
                versions=[MODEL_VERSION],
                platform=PLATFORM,
                inputs=[_tensor_metadata(n, d, s) for n, d, s, _ in INPUTS],
                outputs=[_tensor_metadata(n, d, s) for n, d, s in OUTPUTS],
            )

        return await self._unary(context, answer)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(context, lambda: pb.ModelConfigResponse(
            config=_model_config(self.models.client(request.name, request.version))
        ))  # fmt: skip

    async def _unary(self, context: grpc.aio.ServicerContext, answer: Any) -> Any:
        try:
            self._authorize(context)
            return answer()
        except Exception as exc:
            error = _status_of(exc)
            await context.abort(error.code, error.message)

    # --- inference -------------------------------------------------------------------
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """The whole answer in one response (a stream flag is ignored: use ModelStreamInfer)."""
        arrival = time.perf_counter()
        status, stream_type = "OK", "unary"
        model = self.models.model_name()
        try:
            self._authorize(context)
            client = self.models.client(request.model_name, request.model_version)
            model = client.card.name
            parsed = parse_infer_request(request)
            answer = _Answer(request, client, parsed)
            text, last = await self._generate(client, parsed, arrival)
            return answer.response(text, last, streaming=False)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            error = _status_of(exc)
            status = error.code.name
            await context.abort(error.code, error.message)
        finally:
            self.metrics.count_request(model, ENDPOINT_INFER, stream_type, status)
        raise AssertionError("unreachable")  # pragma: no cover - abort raised

    async def _generate(
        self, client: ModelClient, parsed: InferInput, arrival: float
    ) -> tuple[str, Delta]:
        """Run the request to the end: its text and last delta."""
        parts: list[str] = []
        last = Delta("")
        async for delta in self._deltas(client, parsed, arrival):
            parts.append(delta.text)
            last = delta
        return "".join(parts), last

    async def _deltas(
        self, client: ModelClient, parsed: InferInput, arrival: float
    ) -> AsyncIterator[Delta]:
        """The request's deltas, timed into the metrics; closing it closes the engine's."""
        prepared = prepare(client, parsed)
        timer = self.metrics.timer(client.card.name, prepared.prompt_tokens, arrival)
        generated = 0
        try:
            async with contextlib.aclosing(client.stream(prepared)) as deltas:
                async for delta in deltas:
                    timer.tokens(len(delta.token_ids))
                    generated = delta.completion_tokens
                    yield delta
        finally:
            timer.finish(generated)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse | bytes]:
        """Triton's decoupled streaming: the requests of one stream run concurrently, each
        answered by one response per generated chunk (stream=true) or one whole response,
        the last flagged ``triton_final_response``. Ends once the client stops sending and
        every request is answered; cancelling the call cancels them all."""
        try:
            self._authorize(context)
        except RpcError as exc:
            await context.abort(exc.code, exc.message)
        queue: asyncio.Queue[pb.ModelStreamInferResponse | bytes | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, queue))
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_stream(
        self, requests: AsyncIterator[pb.ModelInferRequest], queue: asyncio.Queue[Any]
    ) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                task = asyncio.create_task(self._stream_one(request, queue))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's side of the stream failed
            log.debug("stream ended: %s", exc)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            queue.put_nowait(None)

    async def _stream_one(self, request: pb.ModelInferRequest, queue: asyncio.Queue[Any]) -> None:
        arrival = time.perf_counter()
        status, stream_type = "OK", "unary"
        model = self.models.model_name()
        try:
            client = self.models.client(request.model_name, request.model_version)
            model = client.card.name
            parsed = parse_infer_request(request)
            stream_type = "stream" if parsed.stream else "unary"
            answer = _Answer(request, client, parsed)
            if not parsed.stream:
                text, last = await self._generate(client, parsed, arrival)
                queue.put_nowait(_streamed(answer.response(text, last, streaming=True)))
                return
            async with contextlib.aclosing(self._deltas(client, parsed, arrival)) as deltas:
                fast = TEXT_OUTPUT in parsed.outputs
                async for delta in deltas:
                    if delta.finish_reason is not None:
                        queue.put_nowait(_streamed(answer.response(delta.text, delta, True)))
                    elif fast and delta.text:
                        queue.put_nowait(answer.delta_bytes(delta.text))
                    elif delta.text:
                        queue.put_nowait(_streamed(answer.response(delta.text, None, True)))
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            error = _status_of(exc)
            status = error.code.name
            queue.put_nowait(pb.ModelStreamInferResponse(error_message=error.message))
        finally:
            self.metrics.count_request(model, ENDPOINT_STREAM, stream_type, status)


_LENGTH = struct.Struct("<I")  # a raw BYTES element's length prefix
_RAW_OUTPUT = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited
_INFER_RESPONSE = b"\x12"  # ModelStreamInferResponse.infer_response: field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _serialize(message: Any) -> bytes:
    """Messages, or responses already serialized by hand (``_Answer.delta_bytes``)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _streamed(response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=response)
