"""Parse ``in=`` / ``out=`` / MODEL / flags into plain dataclasses. Every user error in
what was typed is raised here as a SpecError with one line naming the bad part."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_run.settings import Settings, SpecError, did_you_mean, validate

# The flags of a run are its Settings (declared once, in settings.py); the old name stays.
Flags = Settings

INPUTS = ("text", "http", "grpc", "http,grpc", "batch", "dyn")
# Inputs that serve every model of out=dyn (a directory) rather than wait for one.
SERVER_INPUTS = ("http", "grpc", "http,grpc")
ENGINE_OUTPUTS = ("echo", "mocker", "llamacpp", "vllm", "sglang", "trtllm", "auto")
OUTPUTS = (*ENGINE_OUTPUTS, "dyn")


@dataclass(frozen=True)
class Endpoint:
    """``dyn://namespace.component.endpoint``."""

    namespace: str
    component: str
    name: str

    @property
    def url(self) -> str:
        return f"dyn://{self.namespace}.{self.component}.{self.name}"

    @classmethod
    def parse(cls, text: str, where: str) -> Endpoint:
        body = text.removeprefix("dyn://")
        parts = body.split(".")
        if len(parts) != 3 or not all(
            p and p.replace("-", "").replace("_", "").isalnum() for p in parts
        ):
            raise SpecError(
                f"{where}: '{text}' is not an endpoint; expected dyn://namespace.component.endpoint"
            )
        return cls(*parts)


@dataclass(frozen=True)
class InputSpec:
    kind: str  # text | http | grpc | http,grpc | batch | dyn
    batch_path: Path | None = None
    endpoint: Endpoint | None = None


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # an engine name, or "dyn"
    endpoint: Endpoint | None = None

    @property
    def is_engine(self) -> bool:
        return self.kind != "dyn"


@dataclass
class RunSpec:
    input: InputSpec
    output: OutputSpec
    model: str | None
    flags: Settings
    extra_engine_args: dict[str, Any] = field(default_factory=dict)
    request_template: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # the --chat-template file's text, compiled once here


def parse_input(value: str) -> InputSpec:
    if value == "text":
        return InputSpec("text")
    if value in ("http", "grpc"):
        return InputSpec(value)
    if "," in value:
        kinds = sorted({k.strip() for k in value.split(",")})
        if kinds == ["grpc", "http"]:
            return InputSpec("http,grpc")
        raise SpecError(
            f"in={value}: only http and grpc run together (in=http,grpc); "
            "other inputs run one per process"
        )
    if value == "batch" or value.startswith("batch:"):
        path = value.partition(":")[2]
        if not path:
            raise SpecError("in=batch needs a file: in=batch:prompts.jsonl")
        return InputSpec("batch", batch_path=Path(path).expanduser())
    if value.startswith("dyn://"):
        return InputSpec("dyn", endpoint=Endpoint.parse(value, "in="))
    raise SpecError(
        f"in={value}: unknown input{did_you_mean(value, INPUTS)}; "
        "choose text, http, grpc, http,grpc, batch:FILE or dyn://ns.component.endpoint"
    )


def parse_output(value: str) -> OutputSpec:
    if value in ENGINE_OUTPUTS or value == "dyn":
        return OutputSpec(value)
    if value.startswith("dyn://"):
        return OutputSpec("dyn", endpoint=Endpoint.parse(value, "out="))
    raise SpecError(
        f"out={value}: unknown output{did_you_mean(value, OUTPUTS)}; "
        f"choose one of {', '.join(OUTPUTS)} or dyn://ns.component.endpoint"
    )


def _load_json_object(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{flag} {path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{flag} {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{flag} {path}: expected a JSON object")
    return data


def _load_chat_template(path: Path) -> str:
    """The text of a --chat-template file, checked to compile as a jinja template."""
    from dynamo_run.model.template import ChatTemplate, TemplateError

    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"--chat-template {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"--chat-template {path}: cannot read: {exc}") from None
    if not source.strip():
        raise SpecError(f"--chat-template {path}: the file is empty")
    try:
        ChatTemplate(source)
    except TemplateError as exc:
        raise SpecError(f"--chat-template {path}: {exc}".replace("\n", " ")) from None
    return source


def _validate_combinations(flags: Settings) -> None:
    """What no single setting's declaration can say: settings that go (or not) together."""
    if flags.nats_listen is not None and flags.nats_url:
        raise SpecError("--nats-listen starts the embedded server; --nats-url uses another")
    if bool(flags.tls_cert_path) != bool(flags.tls_key_path):
        raise SpecError("--tls-cert-path and --tls-key-path must be given together")


def parse_run_spec(args: list[str], flags: Settings) -> RunSpec:
    """``args`` are the positional words (in=..., out=..., MODEL) in any order."""
    input_spec: InputSpec | None = None
    output_spec: OutputSpec | None = None
    model: str | None = None
    for word in args:
        key, sep, value = word.partition("=")
        if sep and key == "in":
            if input_spec is not None:
                raise SpecError(f"{word}: in= given twice")
            input_spec = parse_input(value)
        elif sep and key == "out":
            if output_spec is not None:
                raise SpecError(f"{word}: out= given twice")
            output_spec = parse_output(value)
        elif sep and "/" not in key and not Path(word).exists():
            raise SpecError(
                f"{word}: unknown spec '{key}='{did_you_mean(key, ['in', 'out'])}; "
                "specs are in=INPUT and out=OUTPUT"
            )
        else:
            if model is not None:
                raise SpecError(f"{word}: a second MODEL; '{model}' was already given")
            model = word
    if flags.model_path:
        if model is not None and model != flags.model_path:
            raise SpecError(f"--model-path {flags.model_path}: MODEL '{model}' was also given")
        model = flags.model_path
    _validate_combinations(flags)
    validate(flags)
    spec = RunSpec(input_spec or InputSpec("text"), output_spec or OutputSpec("auto"), model, flags)
    if flags.extra_engine_args:
        spec.extra_engine_args = _load_json_object(flags.extra_engine_args, "--extra-engine-args")
    if flags.request_template:
        spec.request_template = _load_json_object(flags.request_template, "--request-template")
    if spec.input.kind == "http,grpc" and flags.http_port == flags.grpc_port:
        raise SpecError(f"--http-port and --grpc-port are both {flags.http_port}; use two ports")
    if flags.chat_template:
        spec.chat_template = _load_chat_template(flags.chat_template)
    if spec.input.kind == "dyn" and not spec.output.is_engine:
        raise SpecError("in=dyn://... serves an engine; out=dyn cannot be used with it")
    return spec
