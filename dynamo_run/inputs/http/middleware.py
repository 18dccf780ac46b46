"""One pure-ASGI middleware for what every request needs: the API key check, the access log
line, the request counter, a last-resort 500 that never carries a traceback, and the direct
dispatch of the generation endpoints (the per-token path).

Pure ASGI (not BaseHTTPMiddleware) so that streamed responses pass through untouched and a
client's disconnect still reaches the handler.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynamo_run.inputs.http.errors import ApiError, known_error
from dynamo_run.metrics import FrontendMetrics

access_log = logging.getLogger("dynamo_run.http.access")
log = logging.getLogger("dynamo_run.http")

# Status recorded for a response the client abandoned (nginx's convention).
CLIENT_CLOSED = 499

_ENDPOINTS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
}
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class RequestInfo:
    """What a handler tells the middleware about its request (stored in the ASGI scope)."""

    request_type: str = "unary"
    status: int | None = None  # overrides the HTTP status in metrics (499, mid-stream 500)


def request_info(scope: Scope) -> RequestInfo:
    info = scope.get("dynamo_run")
    if info is None:
        info = scope["dynamo_run"] = RequestInfo()
    return info


def endpoint_label(path: str) -> str:
    name = _ENDPOINTS.get(path)
    if name is None:
        name = "models" if path.startswith("/v1/models/") else "other"
    return name


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])


async def _call_direct(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a route handler without FastAPI's stack, mapping known errors the same way."""
    try:
        response = await handler(Request(scope, receive, send))
    except Exception as exc:
        error = known_error(exc, scope["method"], scope["path"])
        if error is None:
            raise
        response = error.response()
    await response(scope, receive, send)


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, code=code, headers={"www-authenticate": "Bearer"})


class ServerMiddleware:
    """Wraps the FastAPI app. ``api_key``: required as ``Authorization: Bearer`` on /v1.

    ``fast_routes`` maps (method, path) to the handlers of the generation endpoints, which
    are called directly: FastAPI's middleware layers and router would add a few
    microseconds to every streamed chunk. They are FastAPI routes too, for the OpenAPI
    document and for requests with an Origin header (CORS), which take the full stack.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: FrontendMetrics,
        model_name: Callable[[], str],
        api_key: str | None = None,
        fast_routes: dict[tuple[str, str], Handler] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.model_name = model_name
        self.api_key = api_key.encode() if api_key else None
        self.fast_routes = fast_routes or {}

    def _check_key(self, scope: Scope) -> ApiError | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self.api_key or b""
                ):
                    return None
                return _unauthorized("Incorrect API key provided.", "invalid_api_key")
        return _unauthorized(
            "You didn't provide an API key; send it as 'Authorization: Bearer KEY'.",
            "missing_api_key",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope["path"]
        status = 0
        completed = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        try:
            denied = None
            # CORS preflights carry no credentials; the request that follows does.
            if self.api_key is not None and path.startswith("/v1") and scope["method"] != "OPTIONS":
                denied = self._check_key(scope)
            handler = self.fast_routes.get((scope["method"], path))
            if denied is not None:
                await denied.response()(scope, receive, send_wrapper)
            elif handler is not None and not _has_origin(scope):
                await _call_direct(handler, scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            log.exception("%s %s failed: %s", scope["method"], path, exc)
            request_info(scope).status = 500
            if status == 0:
                error = ApiError(500, "internal server error", code="internal_error")
                await error.response()(scope, receive, send_wrapper)
        finally:
            self._record(scope, path, status, completed, time.perf_counter() - start)

    def _record(
        self, scope: Scope, path: str, status: int, completed: bool, elapsed: float
    ) -> None:
        info: RequestInfo | None = scope.get("dynamo_run")
        shown = status
        if info is not None and info.status is not None:
            shown = info.status
        elif status and not completed:
            shown = CLIENT_CLOSED
        if path.startswith("/v1/"):
            request_type = info.request_type if info is not None else "unary"
            self.metrics.count_request(self.model_name(), endpoint_label(path), request_type, shown)
        if access_log.isEnabledFor(logging.INFO):
            client: Any = scope.get("client")
            host = client[0] if client else "-"
            access_log.info(
                '%s "%s %s" %s %.1fms', host, scope["method"], path, shown, elapsed * 1000.0
            )
