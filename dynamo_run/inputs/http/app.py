"""The FastAPI application of ``in=http``: OpenAI routes, health, metrics.

Request bodies are read as raw JSON so that ``--request-template`` defaults can be merged in
before validation; the OpenAPI document still describes them (see ``_openapi``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from dynamo_run import __version__
from dynamo_run.inputs.http.errors import (
    ApiError,
    install_error_handlers,
    validation_error,
)
from dynamo_run.inputs.http.generate import Generation, collect, sse_events, unless_disconnected
from dynamo_run.inputs.http.middleware import ServerMiddleware, request_info
from dynamo_run.inputs.http.render import ChatChunks, CompletionChunks, dumps
from dynamo_run.pipeline.admission import Ticket
from dynamo_run.pipeline.client import Completion, ModelClient
from dynamo_run.pipeline.preprocess import new_request_id
from dynamo_run.pipeline.responses import (
    TokenTexts,
    chat_completion_body,
    embedding_body,
    embedding_token_ids,
    text_completion_body,
)
from dynamo_run.pipeline.serving import ServedModels
from dynamo_run.protocol import json_input
from dynamo_run.protocol.json_input import JsonTooDeep
from dynamo_run.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelInfo,
    ModelList,
)

M = TypeVar("M", bound=BaseModel)

WORKER_HEADER = "x-dynamo-worker"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
MAX_BODY_BYTES = 32 << 20  # larger bodies get a 413
# A stream silent this long (a long prefill) gets a comment line, so that proxies and clients
# with idle timeouts keep it; SSE clients ignore comments.
DEFAULT_SSE_KEEPALIVE_S = 15.0
PING = b": ping\n\n"


async def _client_and_body(
    models: ServedModels, request: Request
) -> tuple[ModelClient, dict[str, Any]]:
    """503 while loading (before reading the body), then the client of the body's model."""
    models.directory()
    body = await _body(request)
    name = body.get("model")  # not a string: as if absent (validation then reports it)
    return models.lookup(name if isinstance(name, str) else None), body


class SSEResponse(StreamingResponse):
    """A streamed response whose generator is always closed when the response ends, so a
    client that hangs up releases the engine at once rather than at garbage collection.

    While no event has been sent for ``keepalive_s`` (a long prefill), a ``: ping`` comment
    is, as sse-starlette does; the per-event cost is one clock read."""

    def __init__(
        self,
        content: Any,
        late_headers: Callable[[], dict[str, str]] | None = None,
        on_close: Callable[[], None] | None = None,
        keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S,
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.late_headers = late_headers  # headers known once the first event is ready
        self.on_close = on_close  # called once the response ended, however it ended
        self.keepalive_s = keepalive_s
        self._events = content
        self._first: asyncio.Future[Any] | None = None  # the first event, while primed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self.late_headers is None or await self._prime(receive):
                await super().__call__(scope, receive, send)
        finally:
            first = self._first
            if first is not None and not first.done():  # hung up during a long prefill
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            await self._events.aclose()
            if self.on_close is not None:
                self.on_close()

    async def _prime(self, receive: Receive) -> bool:
        """Wait for the first event, then add the headers it made known. False if the
        client hung up first: waiting for a worker's first token (queued behind others)
        must not outlast the client, or abandoned requests stay queued everywhere. A first
        event slower than the keep-alive interval is not waited for: the stream starts
        (with pings) without those headers rather than be dropped as idle."""
        events = self._events
        first = self._first = asyncio.ensure_future(events.__anext__())
        gone = asyncio.ensure_future(_disconnect(receive))
        timeout = self.keepalive_s if self.keepalive_s > 0 else None
        try:
            await asyncio.wait({first, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            with contextlib.suppress(BaseException):
                await gone
        if not first.done():
            if gone.done() and not gone.cancelled():
                return False  # hung up while waiting: __call__ cancels ``first``
        else:
            try:
                first.result()
            except StopAsyncIteration:
                return True
            except BaseException:
                pass  # raised again below, inside the response
            else:
                assert self.late_headers is not None
                for name, value in self.late_headers().items():
                    self.headers[name] = value

        async def chained() -> Any:
            try:
                yield await first
            except StopAsyncIteration:
                return
            async for event in events:
                yield event

        self.body_iterator = chained()
        return True

    async def stream_response(self, send: Send) -> None:
        if self.keepalive_s <= 0:
            await super().stream_response(send)
            return
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        lock = asyncio.Lock()  # never two sends at once
        last_sent = time.monotonic()

        async def pings() -> None:
            nonlocal last_sent
            while True:
                await asyncio.sleep(last_sent + self.keepalive_s - time.monotonic())
                async with lock:
                    if time.monotonic() - last_sent >= self.keepalive_s:
                        last_sent = time.monotonic()
                        await send({"type": "http.response.body", "body": PING, "more_body": True})

        pinger = asyncio.create_task(pings(), name="sse-keepalive")
        try:
            async for chunk in self.body_iterator:
                async with lock:
                    last_sent = time.monotonic()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pinger
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has hung up (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _json_body(body: dict[str, Any], status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object in the body; 413 past MAX_BODY_BYTES, 400 if not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        parts.append(part)
    raw = b"".join(parts)
    try:
        body = json_input.loads(raw) if raw else None
    except JsonTooDeep as exc:
        raise ApiError(400, f"the request body is {exc}", code="json_too_deep") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")


def _parse(client: ModelClient, body: dict[str, Any], model: type[M]) -> M:
    """Apply --request-template defaults, validate, and check the model name."""
    body = client.preprocessor.apply_template(body)
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    name = getattr(req, "model", None)
    if name is not None and name != client.card.name:
        raise ApiError(
            404,
            f"The model `{name}` does not exist; this server serves `{client.card.name}`.",
            param="model",
            code="model_not_found",
        )
    return req


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Invalid request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (500, "Engine failure"),
        (503, "The model is loading"),
    )
}


def _responses(model: type[BaseModel], streams: bool) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"model": model, "description": "The response"}
    if streams:
        event = {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": f"a JSON {model.__name__} chunk; the last event is [DONE]",
                }
            },
        }
        ok["content"] = {"text/event-stream": {"schema": event}}
        ok["description"] = "The response; with stream=true, SSE chunks ending in [DONE]"
    return {200: ok, **_ERRORS}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_app(
    models: ServedModels,
    api_key: str | None = None,
    sse_keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S,
) -> ServerMiddleware:
    """The ASGI application: FastAPI routes wrapped in the server middleware. ``models``
    may be shared with another input of the process (in=http,grpc)."""
    app = FastAPI(
        title="dynamo-run",
        version=__version__,
        description="OpenAI-compatible API of dynamo-run",
        docs_url="/docs",
        redoc_url=None,
    )
    # Browser clients (chat UIs) call the API from other origins, as with vLLM and llama.cpp.
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
    )
    install_error_handlers(app)
    metrics = models.metrics

    @app.get("/health", responses={503: {"description": "The model is loading"}})
    async def health() -> Response:
        """200 once the model is loaded, 503 (with a JSON body) before."""
        return _health(models)

    @app.get("/live", responses={503: {"description": "The model is loading"}})
    async def live() -> Response:
        """Same as /health: the server can answer requests."""
        return _health(models)

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics (dynamo_frontend_*)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_ERRORS})
    async def list_models() -> Response:
        return _json(ModelList(data=[_model_info(models, c) for c in models.clients()]))

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": ModelInfo}, **_ERRORS})
    async def get_model(model_id: str) -> Response:
        client = models.directory().get(model_id)
        if client is None:
            raise ApiError(404, f"The model `{model_id}` does not exist.", code="model_not_found")
        return _json(_model_info(models, client))

    @app.post(
        "/v1/chat/completions",
        responses=_responses(ChatCompletionResponse, streams=True),
        openapi_extra=_body_doc(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Response:
        """Chat completion, streamed (SSE) or whole."""
        arrival = time.perf_counter()
        client, body = await _client_and_body(models, request)
        models.check_room(client)
        info = request_info(request.scope)
        req = _parse(client, body, ChatCompletionRequest)
        prepared = client.prepare_chat(req)  # tools, response_format: 400 if unservable
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        gen = Generation(client, [prepared], req.n, metrics, arrival, info, top_n)
        head = new_request_id("chatcmpl"), int(time.time()), client.card.name
        texts = _token_texts(client, top_n)
        ticket = models.admit(client, req.n)
        if req.stream:
            chunks = ChatChunks(*head, _include_usage(req), texts, top_n or 0)
            return _stream(gen, chunks, ticket, sse_keepalive_s)
        return await _whole(
            request,
            gen,
            lambda done: chat_completion_body(*head, prepared, done, texts, top_n or 0),
            ticket,
        )

    @app.post(
        "/v1/completions",
        responses=_responses(CompletionResponse, streams=True),
        openapi_extra=_body_doc(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        """Text completion of one prompt or a batch of prompts, streamed (SSE) or whole."""
        arrival = time.perf_counter()
        client, body = await _client_and_body(models, request)
        models.check_room(client)
        info = request_info(request.scope)
        req = _parse(client, body, CompletionRequest)
        prompts = client.preprocessor.completion(req)
        top_n = req.logprobs
        gen = Generation(client, prompts, req.n, metrics, arrival, info, top_n)
        head = new_request_id("cmpl"), int(time.time()), client.card.name
        texts = _token_texts(client, top_n)
        ticket = models.admit(client, len(prompts) * req.n)
        if req.stream:
            echoed = [p.prompt_text for p in gen.choices()] if req.echo else None
            chunks = CompletionChunks(
                *head, _include_usage(req), texts, top_n or 0, echo_prompts=echoed
            )
            return _stream(gen, chunks, ticket, sse_keepalive_s)
        return await _whole(
            request,
            gen,
            lambda done: text_completion_body(*head, prompts, done, req.echo, texts, top_n or 0),
            ticket,
        )

    @app.post(
        "/v1/embeddings",
        responses=_responses(EmbeddingResponse, streams=False),
        openapi_extra=_body_doc(EmbeddingRequest),
    )
    async def embeddings(request: Request) -> Response:
        """Embeddings, for engines that can compute them."""
        client, body = await _client_and_body(models, request)
        req = _parse(client, body, EmbeddingRequest)
        return await _embeddings(request, client, req)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    fast_routes = {
        ("POST", "/v1/chat/completions"): chat_completions,
        ("POST", "/v1/completions"): completions,
        ("POST", "/v1/embeddings"): embeddings,
    }
    return ServerMiddleware(app, metrics, models.model_name, api_key, fast_routes)


def _health(models: ServedModels) -> Response:
    directory = models.loaded()
    if directory is not None:
        names = directory.names()
        body: dict[str, Any] = {"status": "healthy", "model": names[0] if names else None}
        if directory.where:
            body["models"] = names
        return _json_body(body)
    failed = models.loading.done()
    body = {
        "status": "failed" if failed else "loading",
        "message": "the model failed to load" if failed else "the model is loading",
    }
    return _json_body(body, 503)


def _model_info(models: ServedModels, client: ModelClient) -> ModelInfo:
    return ModelInfo(
        id=client.card.name,
        created=models.created,
        max_model_len=client.card.context_length,
        generation_defaults=client.preprocessor.defaults.describe(),
    )


def _include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _token_texts(client: ModelClient, top_n: int | None) -> TokenTexts | None:
    """Token texts for logprobs, when the request asked for them."""
    return None if top_n is None else TokenTexts(client.card.tokenizer)


def _stream(
    gen: Generation,
    chunks: ChatChunks | CompletionChunks,
    ticket: Ticket,
    keepalive_s: float,
) -> Response:
    gen.info.request_type = "stream"
    if not gen.client.engine.capabilities().remote:
        return SSEResponse(
            sse_events(gen, chunks), on_close=ticket.release, keepalive_s=keepalive_s
        )
    gen.hold_opening = True
    return SSEResponse(
        sse_events(gen, chunks),
        lambda: {WORKER_HEADER: ",".join(gen.workers)} if gen.workers else {},
        ticket.release,
        keepalive_s,
    )


async def _whole(
    request: Request,
    gen: Generation,
    body: Callable[[list[Completion]], dict[str, Any]],
    ticket: Ticket,
) -> Response:
    """Run every choice to the end and answer with the body built from them (204 if the
    client hung up first)."""
    try:
        done = await unless_disconnected(request, collect(gen), gen.info)
    finally:
        ticket.release()
    if done is None:
        return Response(status_code=204)
    response = _json_body(body(done))
    workers = list(dict.fromkeys(c.worker_id for c in done if c.worker_id))
    if workers:  # out=dyn: which worker instance(s) served it
        response.headers[WORKER_HEADER] = ",".join(workers)
    return response


async def _embeddings(request: Request, client: ModelClient, req: EmbeddingRequest) -> Response:
    if not client.engine.capabilities().embeddings:
        raise ApiError(400, "model does not support embeddings", param="model")
    token_ids = embedding_token_ids(client, req)
    vectors = await unless_disconnected(
        request, client.engine.embed(token_ids), request_info(request.scope)
    )
    if vectors is None:
        return Response(status_code=204)
    return _json_body(embedding_body(client.card.name, req, token_ids, vectors))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request body schemas the routes read by hand."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in doc.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = doc
    app.openapi_schema = schema
    return schema
