"""What a chat request asks of its answer beyond text: ``tools`` / ``tool_choice``,
``response_format`` (JSON object or schema) and reasoning, checked against what the engine
can enforce, and reduced to the guided-decoding fields of the engine request plus the
:class:`OutputPlan` the postprocessor reads answers with.

Decisions (documented in the README):

- ``tool_choice: none`` keeps the tools in the prompt (the template still describes them,
  as vLLM does) but the answer is never parsed for calls.
- ``tool_choice: auto`` (the default with tools) needs a tool-call parser: ``--tool-call-parser``
  or one detected from the chat template. Without one the request is refused (400) rather
  than answered as if the tools were not there.
- ``tool_choice: required`` or a named function needs an engine that enforces JSON schemas:
  the answer is constrained to ``{"name": ..., "arguments": {...}}`` for the allowed
  function(s) and parsed with the ``json`` parser, so even a small model returns a valid call.
- Answers constrained to JSON are not run through the reasoning parser (the grammar does not
  allow a think block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamo_run.errors import RequestError
from dynamo_run.model.card import ModelCard
from dynamo_run.parsers import detect_tool_call_parser
from dynamo_run.pipeline.answer import OutputPlan
from dynamo_run.protocol.openai import ChatCompletionRequest, NamedToolChoice

# JSON Schema keywords every engine here enforces (llama.cpp's schema-to-grammar converter;
# vLLM's guided decoding enforces more). ``strict: true`` refuses a schema using others.
ENFORCED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems",
        "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
        "definitions", "pattern", "format", "minLength", "maxLength",
    }
)  # fmt: skip
# Keywords that describe rather than constrain: always fine.
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly", "name", "strict",
    }
)  # fmt: skip
ENFORCED_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3",
                              "uuid4", "uuid5"})  # fmt: skip


@dataclass
class Guidance:
    """The guided-decoding fields of the engine request, and how to read the answer."""

    json_object: bool = False
    json_schema: dict[str, Any] | None = None
    plan: OutputPlan | None = None


def unenforced_keywords(schema: Any, where: str = "$") -> list[str]:
    """``keyword at path`` for every constraint in ``schema`` no engine here enforces."""
    found: list[str] = []
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            found += unenforced_keywords(item, f"{where}[{i}]")
        return found
    if not isinstance(schema, dict):
        return found
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                found += unenforced_keywords(sub, f"{where}.{key}.{name}")
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
            found += unenforced_keywords(value, f"{where}.{key}")
        elif key == "format" and value not in ENFORCED_FORMATS:
            found.append(f"format '{value}' at {where}")
        elif key not in ENFORCED_KEYWORDS and key not in ANNOTATIONS:
            found.append(f"'{key}' at {where}")
    return found


def _check_schema(schema: Any, strict: bool, where: str, param: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise RequestError(f"{where} must be a JSON Schema object", param=param)
    if strict:
        loose = unenforced_keywords(schema)
        if loose:
            raise RequestError(
                f"{where}: strict is true but these constraints cannot be enforced: "
                f"{', '.join(loose[:5])}; drop them or set strict to false",
                param=param,
            )
    return schema


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the ``function`` object of each tool, validated."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"tools[{i}]: only function tools are supported", param="tools")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}].function.name: required, a string", param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(
                f"tools[{i}].function.parameters must be a JSON Schema object", param="tools"
            )
        functions[fn["name"]] = fn
    return functions


def call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one call of ``fn``: its name and arguments for its parameters."""
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if bool(fn.get("strict")):
        _check_schema(params, True, f"function '{fn['name']}' parameters", "tools")
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
    }


def _forced_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    calls = [call_schema(fn) for fn in functions]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if not parallel:
        return one
    return {"type": "array", "items": one, "minItems": 1}


def _response_format(
    req: ChatCompletionRequest, can_object: bool, can_schema: bool, engine: str
) -> tuple[bool, dict[str, Any] | None]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return False, None
    where = f" (out={engine})" if engine else ""
    if fmt.type == "json_object":
        if not can_object:
            raise RequestError(
                f"response_format json_object is not supported by this engine{where}",
                param="response_format",
            )
        return True, None
    spec = fmt.json_schema
    if spec is None or spec.schema_ is None:
        raise RequestError(
            "response_format.json_schema.schema is required for type json_schema",
            param="response_format",
        )
    if not can_schema:
        raise RequestError(
            f"response_format json_schema is not supported by this engine{where}; the "
            "llamacpp and vllm engines enforce it",
            param="response_format",
        )
    schema = _check_schema(
        spec.schema_, bool(spec.strict), "response_format.json_schema.schema", "response_format"
    )
    return False, schema


def _tool_plan(
    req: ChatCompletionRequest, card: ModelCard, can_schema: bool, engine: str
) -> tuple[OutputPlan, dict[str, Any] | None]:
    """The tool-call part of the plan, and the forced call's schema when there is one."""
    tools = req.tools or None
    choice = req.tool_choice
    if tools is None:
        if choice is not None and choice not in ("none", "auto"):
            raise RequestError("tool_choice needs tools in the request", param="tool_choice")
        return OutputPlan(), None
    functions = _functions(tools)
    choice = choice or "auto"
    if choice == "none":
        return OutputPlan(tools=tools), None
    if choice == "auto":
        parser = card.tool_call_parser or detect_tool_call_parser(card.chat_template.source)
        if parser is None:
            raise RequestError(
                "this model's chat template shows no tool-call format dynamo-run can parse; "
                "start it with --tool-call-parser (hermes, llama3_json, mistral, pythonic) "
                "and, if its template ignores tools, --chat-template FILE; or use "
                "tool_choice required / a named function",
                param="tools",
            )
        return OutputPlan(tool_parser=parser, tools=tools), None
    if isinstance(choice, NamedToolChoice):
        fn = functions.get(choice.function.name)
        if fn is None:
            raise RequestError(
                f"tool_choice names function '{choice.function.name}', which is not in tools",
                param="tool_choice",
            )
        chosen = [fn]
    else:  # required
        chosen = list(functions.values())
    if not can_schema:
        where = f" (out={engine})" if engine else ""
        raise RequestError(
            f"tool_choice required or a named function needs an engine that enforces JSON "
            f"schemas (llamacpp, vllm); this one cannot{where}",
            param="tool_choice",
        )
    if req.response_format is not None and req.response_format.type != "text":
        raise RequestError(
            "a forced tool call (tool_choice required or named) cannot be combined with "
            "response_format",
            param="response_format",
        )
    parallel = req.parallel_tool_calls is True and len(chosen) > 1
    plan = OutputPlan(tool_parser="json", tools=tools, forced=True)
    return plan, _forced_schema(chosen, parallel)


def plan_chat(
    req: ChatCompletionRequest,
    card: ModelCard,
    can_object: bool,
    can_schema: bool,
    engine: str = "",
) -> Guidance:
    """Check a chat request's tools and formats against the engine; RequestError if not
    servable. ``can_object`` / ``can_schema``: the engine's guided-decoding support."""
    json_object, schema = _response_format(req, can_object, can_schema, engine)
    plan, forced = _tool_plan(req, card, can_schema, engine)
    if forced is not None:
        schema = forced
    constrained = json_object or schema is not None
    if card.reasoning_parser and not constrained:
        plan.reasoning_parser = card.reasoning_parser
    return Guidance(json_object, schema, plan if plan.active else None)
