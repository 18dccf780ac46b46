"""Strict copies of the server's response models, for tests that check hand-built JSON.

The protocol models ignore keys they do not know, so a misspelt optional key in a streamed
chunk (``"finish_reasn"``) would validate and go unnoticed. ``strict(Model)`` is the same
model with ``extra="forbid"`` at every level of nesting.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, create_model

_made: dict[type[BaseModel], type[BaseModel]] = {}


def strict(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` and every model nested in its fields, forbidding unknown keys."""
    if model not in _made:
        fields: dict[str, Any] = {
            name: (_strict_type(info.annotation), info) for name, info in model.model_fields.items()
        }
        _made[model] = create_model(  # type: ignore[call-overload]
            f"Strict{model.__name__}", __config__=ConfigDict(extra="forbid"), **fields
        )
    return _made[model]


def _strict_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return strict(annotation)
    origin = get_origin(annotation)
    if origin is None or origin is Literal:
        return annotation
    args = tuple(_strict_type(arg) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        return Union[args]  # noqa: UP007 - built from a tuple
    return origin[args]


def validate_json(model: type[BaseModel], text: str | bytes) -> Any:
    """``text`` parsed as ``model``, failing on any key the model does not define."""
    return strict(model).model_validate_json(text)
