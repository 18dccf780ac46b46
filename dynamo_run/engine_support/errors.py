"""One line for an engine that failed to start: the cause a user can act on (out of GPU
memory, a model the engine cannot load, a bad engine argument), never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from dynamo_run.engine import EngineError

_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda_error_out_of_memory")


def short(exc: BaseException, limit: int = 300) -> str:
    """The last non-empty line of an exception's message (where engines put the cause)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's whole message squeezed onto one line (pydantic errors span several
    lines and each one matters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_error(
    name: str,
    model: str,
    exc: BaseException,
    cause: str | None = None,
    log_file: Path | None = None,
) -> EngineError:
    """The EngineError for an exception raised while ``name`` loaded ``model``; ``cause``
    is the root cause read from the engine's log (its child processes fail there, and the
    exception that reaches us often only says "see above")."""
    what = cause or short(exc)
    where = f" (log: {log_file})" if log_file is not None else ""
    full = f"{type(exc).__name__}: {exc} {cause or ''}".lower()
    if any(marker in full for marker in _OOM_MARKERS):
        return EngineError(
            f"{name}: out of GPU memory loading '{model}' ({what}); try a smaller model, "
            f"a shorter --context-length, or a smaller KV cache in --extra-engine-args{where}"
        )
    return EngineError(f"{name}: cannot load '{model}': {what}{where}")


def unknown_argument_error(name: str, exc: TypeError, known: Iterable[str]) -> EngineError:
    """The EngineError for a keyword the engine's argument class rejected, with the closest
    known names (typos in --extra-engine-args are the usual cause)."""
    text = short(exc)
    bad = text.rsplit("'", 2)[1] if text.count("'") >= 2 else ""
    close = difflib.get_close_matches(bad, list(known), n=3) if bad else []
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return EngineError(f"{name}: bad engine argument: {text}{hint}")
