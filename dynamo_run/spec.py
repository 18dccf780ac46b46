"""Parse ``in=`` / ``out=`` / MODEL / flags into plain dataclasses. Every user error in
what was typed is raised here as a SpecError with one line naming the bad part."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUTS = ("text", "http", "grpc", "http,grpc", "batch", "dyn")
# Inputs that serve every model of out=dyn (a directory) rather than wait for one.
SERVER_INPUTS = ("http", "grpc", "http,grpc")
ENGINE_OUTPUTS = ("echo", "mocker", "llamacpp", "vllm", "sglang", "trtllm", "auto")
OUTPUTS = (*ENGINE_OUTPUTS, "dyn")
ROUTER_MODES = ("random", "round-robin", "kv")
GENERATION_CONFIG_MODES = ("auto", "none")


class SpecError(ValueError):
    """A bad spec or flag: exit code 2 with this one-line message."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
class Flags:
    """Command-line flags, with Dynamo's names."""

    model_path: str | None = None
    model_name: str | None = None
    context_length: int | None = None
    kv_cache_block_size: int | None = None
    tensor_parallel_size: int | None = None  # GPUs one engine spreads the model over
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8001  # Triton's gRPC port, so Triton clients' default address works
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    migration_limit: int = 0
    router_mode: str = "round-robin"
    kv_overlap_score_weight: float = 1.0  # --router-mode kv: weight of the prefill saved
    router_temperature: float = 0.0  # --router-mode kv: 0 = cheapest; > 0 softmax sampling
    kv_events: bool = True  # --router-mode kv: False = predict caches from past decisions
    router_replica_sync: bool = False  # --router-mode kv: share in-flight load between frontends
    # Admission (in=http; out=dyn per worker): None = the worker's decode slots; 0 = no limit
    max_inflight_per_worker: int | None = None
    request_queue_limit: int | None = None  # requests waiting beyond; None = twice the capacity
    active_decode_blocks_threshold: float | None = None  # 0-1 of KV blocks: the worker is busy
    extra_engine_args: Path | None = None
    request_template: Path | None = None
    generation_config: str = "auto"  # auto: model's and llama.cpp's defaults; none: OpenAI's
    nats_url: str | None = None
    nats_token: str | None = None
    nats_listen: str | None = None  # HOST:PORT: the embedded server reachable from other hosts
    api_key: str | None = None
    verbosity: int = 0
    prompt: str | None = None  # in=text single shot
    output: Path | None = None  # in=batch output file
    batch_concurrency: int | None = None
    overwrite: bool = False
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral | pythonic | json
    reasoning_parser: str | None = None  # deepseek_r1 | qwen3
    chat_template: Path | None = None  # a jinja file replacing the model's chat template


@dataclass
class RunSpec:
    input: InputSpec
    output: OutputSpec
    model: str | None
    flags: Flags
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


def _validate_parsers(flags: Flags) -> None:
    from dynamo_run.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS

    for flag, value, known in (
        ("--tool-call-parser", flags.tool_call_parser, TOOL_CALL_PARSERS),
        ("--reasoning-parser", flags.reasoning_parser, REASONING_PARSERS),
    ):
        if value is not None and value not in known:
            raise SpecError(
                f"{flag} {value}: unknown parser{did_you_mean(value, known)}; "
                f"choose one of {', '.join(known)}"
            )


def _validate_flags(flags: Flags) -> None:
    if not 0 < flags.http_port < 65536:
        raise SpecError(f"--http-port {flags.http_port}: must be between 1 and 65535")
    if not 0 < flags.grpc_port < 65536:
        raise SpecError(f"--grpc-port {flags.grpc_port}: must be between 1 and 65535")
    if flags.context_length is not None and flags.context_length <= 0:
        raise SpecError(f"--context-length {flags.context_length}: must be positive")
    if flags.kv_cache_block_size is not None and flags.kv_cache_block_size <= 0:
        raise SpecError(f"--kv-cache-block-size {flags.kv_cache_block_size}: must be positive")
    if flags.tensor_parallel_size is not None and flags.tensor_parallel_size <= 0:
        raise SpecError(f"--tensor-parallel-size {flags.tensor_parallel_size}: must be positive")
    if flags.migration_limit < 0:
        raise SpecError(f"--migration-limit {flags.migration_limit}: must be 0 or more")
    if flags.batch_concurrency is not None and flags.batch_concurrency <= 0:
        raise SpecError(f"--batch-concurrency {flags.batch_concurrency}: must be positive")
    if flags.router_mode not in ROUTER_MODES:
        raise SpecError(
            f"--router-mode {flags.router_mode}: unknown mode"
            f"{did_you_mean(flags.router_mode, ROUTER_MODES)}; choose {', '.join(ROUTER_MODES)}"
        )
    if flags.kv_overlap_score_weight < 0:
        raise SpecError(f"--kv-overlap-score-weight {flags.kv_overlap_score_weight}: must be >= 0")
    if flags.router_temperature < 0:
        raise SpecError(f"--router-temperature {flags.router_temperature}: must be >= 0")
    if flags.max_inflight_per_worker is not None and flags.max_inflight_per_worker < 0:
        raise SpecError(
            f"--max-inflight-per-worker {flags.max_inflight_per_worker}: must be 0 (no limit) "
            "or more"
        )
    if flags.request_queue_limit is not None and flags.request_queue_limit < 0:
        raise SpecError(f"--request-queue-limit {flags.request_queue_limit}: must be 0 or more")
    threshold = flags.active_decode_blocks_threshold
    if threshold is not None and not 0 < threshold <= 1:
        raise SpecError(f"--active-decode-blocks-threshold {threshold}: must be in (0, 1]")
    if flags.nats_listen is not None:
        host, sep, port = flags.nats_listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SpecError(f"--nats-listen {flags.nats_listen}: expected HOST:PORT")
        if flags.nats_url:
            raise SpecError("--nats-listen starts the embedded server; --nats-url uses another")
    if flags.generation_config not in GENERATION_CONFIG_MODES:
        raise SpecError(
            f"--generation-config {flags.generation_config}: unknown mode"
            f"{did_you_mean(flags.generation_config, GENERATION_CONFIG_MODES)}; choose auto or none"
        )
    if bool(flags.tls_cert_path) != bool(flags.tls_key_path):
        raise SpecError("--tls-cert-path and --tls-key-path must be given together")
    for flag, path in (
        ("--tls-cert-path", flags.tls_cert_path),
        ("--tls-key-path", flags.tls_key_path),
    ):
        if path is not None and not path.is_file():
            raise SpecError(f"{flag} {path}: no such file")
    _validate_parsers(flags)


def parse_run_spec(args: list[str], flags: Flags) -> RunSpec:
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
    if flags.verbosity == 0 and os.environ.get("DYN_LOG"):
        level = os.environ["DYN_LOG"].split(",")[0].strip().lower()
        flags.verbosity = {"debug": 1, "trace": 2}.get(level, 0)
    _validate_flags(flags)
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
