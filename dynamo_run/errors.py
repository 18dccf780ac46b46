"""The errors that cross layers: a bad request, a failed start.

A leaf module (it imports nothing of the package), so that the pipeline, the runner and
every input can raise and catch them without importing each other.
"""

from __future__ import annotations


class RequestError(ValueError):
    """The request is invalid for this model (HTTP 400). ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class RunError(RuntimeError):
    """A failure to start (model, engine): printed as one line, exit code 1."""
