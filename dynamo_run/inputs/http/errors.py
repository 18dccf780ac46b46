"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server knows about becomes one of these with the right status; nothing
ever answers with a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from dynamo_run.errors import RequestError
from dynamo_run.pipeline.admission import RETRY_AFTER_S, Overloaded
from dynamo_run.pipeline.client import EngineFailure, EngineUnavailable
from dynamo_run.pipeline.serving import (
    ModelNotFound,
    ModelRequired,
    NoInstances,
    NotReady,
    ServingError,
)

log = logging.getLogger("dynamo_run.http")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error to send to the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body(), separators=(",", ":")).encode(),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """A 400 naming the first bad field, e.g. ``temperature: Input should be ...``."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    first = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") or None
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ApiError(400, "; ".join(parts) + more, param=first)


def request_error(exc: RequestError) -> ApiError:
    return ApiError(400, str(exc), param=exc.param, code=exc.code)


def serving_error(exc: ServingError) -> ApiError:
    """The models cannot serve the request: loading (503), which model (400, 404), no
    worker for it now (503)."""
    if isinstance(exc, NotReady):
        if exc.failed:
            return ApiError(503, str(exc), code="model_load_failed")
        return ApiError(503, str(exc), code="model_loading", headers={"retry-after": "1"})
    if isinstance(exc, NoInstances):
        param = None if exc.name is None else "model"
        return ApiError(
            503, str(exc), param=param, code="no_instances", headers={"retry-after": "1"}
        )
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelRequired):
        return ApiError(400, str(exc), param="model")
    return ApiError(503, str(exc))


def engine_error(exc: EngineFailure) -> ApiError:
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, str(exc), code="no_instances", headers={"retry-after": "1"})
    return ApiError(500, f"the engine failed: {exc}", code="engine_error")


def overloaded_error(exc: EngineUnavailable) -> ApiError:
    """Admission refused a request: 503 with Retry-After, which clients (openai's too)
    wait before they try again."""
    return ApiError(503, str(exc), code="overloaded", headers={"retry-after": str(RETRY_AFTER_S)})


def known_error(exc: Exception, method: str = "", path: str = "") -> ApiError | None:
    """The OpenAI error for an exception the server expects, or None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError | RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, RequestError):
        return request_error(exc)
    if isinstance(exc, ServingError):
        return serving_error(exc)
    if isinstance(exc, Overloaded):
        return overloaded_error(exc)
    if isinstance(exc, EngineFailure):
        log.error("%s %s: engine failure: %s", method, path, exc)
        return engine_error(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {method} {path}"
        elif exc.status_code == 405:
            message = f"method {method} is not allowed on {path}"
        else:
            message = str(exc.detail)
        return ApiError(exc.status_code, message, headers=exc.headers)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through :func:`known_error`; anything else is a 500."""

    async def on_error(request: Request, exc: Exception) -> Response:
        error = known_error(exc, request.method, request.url.path)
        if error is None:
            # Starlette re-raises after sending this; the server middleware logs the traceback.
            error = ApiError(500, "internal server error", code="internal_error")
        return error.response()

    for kind in (
        Exception,
        ApiError,
        ValidationError,
        RequestValidationError,
        RequestError,
        ServingError,
        EngineFailure,
        StarletteHTTPException,
    ):
        app.add_exception_handler(kind, on_error)
