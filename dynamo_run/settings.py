"""Every dynamo-run setting, declared once.

Each field of :class:`Settings` carries its type, default and a :class:`Setting` (flag
names, environment variable, help, help panel, constraints). From that one declaration
come the command-line options (``settings_cli.py`` generates them for ``cli.py`` and
``ps.py``), the environment and ``--config`` file layers (:func:`resolve`), validation
(:func:`validate`), and the object the runner passes on (``RunSpec.flags``). Precedence:
flag > environment > config file > default.

Adding a setting is one field of :class:`Settings`; its flag, ``--config`` key, environment
variable, help panel and checks follow. A new choice is a :class:`StrEnum` here.

This module is a leaf (standard library only at import) so ``--help`` stays instant.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any


class SpecError(ValueError):
    """A bad spec, flag, environment variable or config file: exit code 2 with this one-line
    message naming the bad part."""


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib  # only on an error: --help stays quick

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class StrEnum(str, enum.Enum):
    """``enum.StrEnum`` for Python 3.10: members compare equal to, and print as, their value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Panel(StrEnum):
    """The ``--help`` panels, in the order they are shown."""

    MODEL = "Model"
    ENGINE = "Engine"
    HTTP = "HTTP"
    GRPC = "gRPC"
    DISTRIBUTED = "Distributed"
    ROUTER = "Router"
    ADMISSION = "Admission"
    BATCH = "Batch"
    SHELL = "Shell"
    PARSERS = "Parsers"
    LOGGING = "Logging"


class RouterMode(StrEnum):
    """``--router-mode``: how ``out=dyn`` picks a worker."""

    RANDOM = "random"
    ROUND_ROBIN = "round-robin"
    KV = "kv"


class GenerationConfig(StrEnum):
    """``--generation-config``: where unset sampling fields come from."""

    AUTO = "auto"  # the model's defaults, then llama.cpp's
    NONE = "none"  # OpenAI's


# DYN_LOG level -> verbosity (-v count). Dynamo's DYN_LOG may add per-target filters after a
# comma ("debug,dynamo_runtime=trace"); the first plain level is the one that counts.
LOG_LEVELS = {"error": -1, "warn": 0, "warning": 0, "info": 1, "debug": 2, "trace": 3}


def verbosity_from_log_level(text: str) -> int:
    """``DYN_LOG`` -> the verbosity ``-v`` (info) / ``-vv`` (debug) would give."""
    levels = [part.strip().lower() for part in text.split(",") if "=" not in part]
    level = next((part for part in levels if part), "warn")
    if level not in LOG_LEVELS:
        raise SpecError(
            f"unknown log level '{level}'{did_you_mean(level, list(LOG_LEVELS))}; "
            f"choose {', '.join(LOG_LEVELS)}"
        )
    return LOG_LEVELS[level]


def python_log_level(verbosity: int) -> int:
    """The ``logging`` level of a verbosity: -1 error, 0 warning, 1 info, 2+ debug."""
    return {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(verbosity, -1), logging.DEBUG
    )


def _host_port(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected HOST:PORT"
    return None


def _existing_file(value: Path) -> str | None:
    return None if value.is_file() else "no such file"


def _registry(module: str, attr: str) -> Callable[[], Sequence[str]]:
    """Choices kept by the registry that owns them (imported only when asked)."""
    return lambda: getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Setting:
    """How one setting appears on the command line, in the environment and in help."""

    help: str
    panel: Panel
    env: str | None = None  # environment variable that sets it
    flags: tuple[str, ...] = ()  # option names when not just --field-name (e.g. -p)
    metavar: str | None = None
    default_help: str | None = None  # what an unset (None) default means, for help
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    choices: Callable[[], Sequence[str]] | None = None  # names kept by a registry
    noun: str = "value"  # "unknown <noun>" in the error for a bad choice
    check: Callable[[Any], str | None] | None = None  # extra check: an error, or None
    count: bool = False  # -v -v: counted
    parse_env: Callable[[str], Any] | None = None  # environment text -> value


S = Setting  # short, for the declarations below


@dataclass
class Settings:
    """Every setting of a run, with Dynamo's names: ``Annotated[type, Setting(...)] = default``.
    Build it with :func:`resolve` from the command line, environment and config file, or
    directly (tests); :func:`validate` checks it either way."""

    # Model
    model_path: Annotated[str | None, S("MODEL, as a flag.", Panel.MODEL, metavar="PATH")] = None
    model_name: Annotated[
        str | None,
        S("Name to serve the model as.", Panel.MODEL, metavar="NAME", default_help="the model's"),
    ] = None
    context_length: Annotated[
        int | None,
        S(
            "Limit the context (tokens).",
            Panel.MODEL,
            metavar="N",
            gt=0,
            default_help="the model's",
        ),
    ] = None
    chat_template: Annotated[
        Path | None,
        S(
            "A jinja chat template file replacing the model's own.",
            Panel.MODEL,
            metavar="FILE",
            default_help="the model's",
        ),
    ] = None
    request_template: Annotated[
        Path | None,
        S("JSON file of defaults merged into every request.", Panel.MODEL, metavar="FILE.json"),
    ] = None
    generation_config: Annotated[
        GenerationConfig,
        S(
            "auto: unset sampling fields take the model's defaults, then llama.cpp's "
            "(temperature 0.8, top_k 40, top_p 0.95, min_p 0.05); none: OpenAI's (temperature 1).",
            Panel.MODEL,
            noun="mode",
        ),
    ] = GenerationConfig.AUTO
    # Engine
    kv_cache_block_size: Annotated[
        int | None,
        S(
            "KV cache block size (tokens).",
            Panel.ENGINE,
            metavar="N",
            gt=0,
            default_help="the engine's",
        ),
    ] = None
    tensor_parallel_size: Annotated[
        int | None,
        S(
            "vllm, sglang, trtllm: GPUs to split the model over.",
            Panel.ENGINE,
            metavar="N",
            gt=0,
            default_help="the engine's",
        ),
    ] = None
    extra_engine_args: Annotated[
        Path | None,
        S("JSON file of engine-specific arguments.", Panel.ENGINE, metavar="FILE.json"),
    ] = None
    # HTTP
    http_host: Annotated[str, S("in=http: address to bind.", Panel.HTTP, metavar="HOST")] = (
        "127.0.0.1"
    )
    http_port: Annotated[
        int, S("in=http: port to bind.", Panel.HTTP, metavar="PORT", ge=1, le=65535)
    ] = 8000
    tls_cert_path: Annotated[
        Path | None,
        S(
            "in=http/grpc: TLS certificate (with --tls-key-path).",
            Panel.HTTP,
            metavar="FILE",
            check=_existing_file,
        ),
    ] = None
    tls_key_path: Annotated[
        Path | None,
        S("in=http/grpc: TLS private key.", Panel.HTTP, metavar="FILE", check=_existing_file),
    ] = None
    api_key: Annotated[
        str | None,
        S("in=http/grpc: require this key.", Panel.HTTP, env="DYN_API_KEY", metavar="KEY"),
    ] = None
    sse_keepalive_s: Annotated[
        float,
        S(
            "in=http: seconds of silence in a stream (a long prefill) before a `: ping` "
            "comment keeps proxies from dropping it; 0: never.",
            Panel.HTTP,
            env="DYN_HTTP_SSE_KEEPALIVE_S",
            metavar="S",
            ge=0,
        ),
    ] = 15.0
    # gRPC
    grpc_host: Annotated[str, S("in=grpc: address to bind.", Panel.GRPC, metavar="HOST")] = (
        "127.0.0.1"
    )
    grpc_port: Annotated[  # Triton's gRPC port, so Triton clients' default address works
        int,
        S(
            "in=grpc: port to bind (Triton's gRPC port).",
            Panel.GRPC,
            metavar="PORT",
            ge=1,
            le=65535,
        ),
    ] = 8001
    # Distributed
    nats_url: Annotated[
        str | None,
        S(
            "An existing NATS server or cluster (comma-separated URLs).",
            Panel.DISTRIBUTED,
            env="NATS_SERVER",
            metavar="URL",
            default_help="the embedded one, shared per host",
        ),
    ] = None
    nats_token: Annotated[
        str | None,
        S(
            "Token for the NATS server.",
            Panel.DISTRIBUTED,
            env="NATS_TOKEN",
            metavar="TOKEN",
            default_help="generated with --nats-listen",
        ),
    ] = None
    nats_listen: Annotated[
        str | None,
        S(
            "Make the embedded NATS server reachable from other hosts (requires a token; one "
            "is generated if --nats-token is not given).",
            Panel.DISTRIBUTED,
            metavar="HOST:PORT",
            check=_host_port,
            default_help="loopback only",
        ),
    ] = None
    migration_limit: Annotated[
        int,
        S(
            "out=dyn: times a stream whose worker died continues on another one.",
            Panel.DISTRIBUTED,
            metavar="N",
            ge=0,
        ),
    ] = 0
    # Router
    router_mode: Annotated[
        RouterMode, S("out=dyn: how a worker is picked.", Panel.ROUTER, noun="mode")
    ] = RouterMode.ROUND_ROBIN
    kv_overlap_score_weight: Annotated[
        float,
        S(
            "--router-mode kv: weight of the prefill a cached prefix saves (0: load only).",
            Panel.ROUTER,
            metavar="W",
            ge=0,
        ),
    ] = 1.0
    router_temperature: Annotated[
        float,
        S(
            "--router-mode kv: 0 picks the cheapest worker; > 0 samples by cost.",
            Panel.ROUTER,
            metavar="T",
            ge=0,
        ),
    ] = 0.0
    kv_events: Annotated[
        bool,
        S(
            "--router-mode kv: use the workers' KV events (else predict their caches).",
            Panel.ROUTER,
        ),
    ] = True
    router_replica_sync: Annotated[
        bool,
        S("--router-mode kv: frontends share the load they put on each worker.", Panel.ROUTER),
    ] = False
    # Admission control (in=http; over out=dyn, per worker)
    max_inflight_per_worker: Annotated[
        int | None,
        S(
            "in=http: requests a worker (or the local engine) takes at once; 0: no limit.",
            Panel.ADMISSION,
            metavar="N",
            ge=0,
            default_help="its decode slots",
        ),
    ] = None
    request_queue_limit: Annotated[
        int | None,
        S(
            "in=http: requests that wait for a busy model before a 503 with Retry-After.",
            Panel.ADMISSION,
            metavar="N",
            ge=0,
            default_help="twice its capacity",
        ),
    ] = None
    active_decode_blocks_threshold: Annotated[
        float | None,
        S(
            "in=http: a worker whose KV blocks are this full (0-1] is busy.",
            Panel.ADMISSION,
            metavar="F",
            gt=0,
            le=1,
            default_help="off",
        ),
    ] = None
    # Batch
    output: Annotated[
        Path | None,
        S(
            "in=batch: output file.",
            Panel.BATCH,
            metavar="FILE",
            default_help="output.jsonl beside the input",
        ),
    ] = None
    batch_concurrency: Annotated[
        int | None,
        S(
            "in=batch: requests in flight.",
            Panel.BATCH,
            metavar="N",
            gt=0,
            default_help="the engine's",
        ),
    ] = None
    overwrite: Annotated[bool, S("in=batch: start afresh instead of resuming.", Panel.BATCH)] = (
        False
    )
    # Shell
    prompt: Annotated[
        str | None,
        S("in=text: answer this and exit.", Panel.SHELL, flags=("--prompt", "-p"), metavar="TEXT"),
    ] = None
    # Parsers
    tool_call_parser: Annotated[
        str | None,
        S(
            "Parse tool calls in answers.",
            Panel.PARSERS,
            metavar="NAME",
            noun="parser",
            choices=_registry("dynamo_run.parsers.tool_calls", "TOOL_CALL_PARSERS"),
            default_help="detected from the chat template when unambiguous",
        ),
    ] = None
    reasoning_parser: Annotated[
        str | None,
        S(
            "Split <think> reasoning into reasoning_content.",
            Panel.PARSERS,
            metavar="NAME",
            noun="parser",
            choices=_registry("dynamo_run.parsers.reasoning", "REASONING_PARSERS"),
        ),
    ] = None
    # Logging
    verbosity: Annotated[
        int,
        S(
            "-v info, -vv debug. DYN_LOG: error, warn, info (= -v), debug (= -vv) or trace.",
            Panel.LOGGING,
            flags=("--verbose", "-v"),
            env="DYN_LOG",
            count=True,
            parse_env=verbosity_from_log_level,
        ),
    ] = 0


@dataclass(frozen=True)
class Declared:
    """One setting as the layers see it: its field, base type and :class:`Setting`."""

    name: str  # the Settings field
    base: type  # int, float, bool, str, Path or an enum
    optional: bool  # None is a value
    default: Any
    meta: Setting

    @property
    def flag(self) -> str:
        """The long option, which errors and help name."""
        longs = [f for f in self.meta.flags if f.startswith("--")]
        return longs[0] if longs else "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The config file key: the long option without its dashes."""
        return self.flag.removeprefix("--")

    def choice_names(self) -> tuple[str, ...] | None:
        if isinstance(self.base, type) and issubclass(self.base, enum.Enum):
            return tuple(str(m.value) for m in self.base)
        return tuple(self.meta.choices()) if self.meta.choices else None


@functools.cache
def declared() -> tuple[Declared, ...]:
    """Every setting, in declaration (and help) order."""
    hints = typing.get_type_hints(Settings, include_extras=True)
    out = []
    for f in fields(Settings):
        hint, meta = typing.get_args(hints[f.name])  # Annotated[type, Setting(...)]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        out.append(Declared(f.name, args[0] if optional else hint, optional, f.default, meta))
    return tuple(out)


def by_key() -> dict[str, Declared]:
    """Config file keys (``http-port`` and ``http_port`` alike) -> the setting."""
    keys: dict[str, Declared] = {}
    for d in declared():
        keys[d.key] = keys[d.key.replace("-", "_")] = keys[d.name] = d
    return keys


# --- turning raw values into checked ones --------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(d: Declared, raw: Any) -> Any:
    """A value from the environment (text) or a config file (TOML/YAML) -> the setting's type;
    SpecError says what was expected."""
    if raw is None:
        if d.optional:
            return None
        raise SpecError("a value is required")
    base, text = d.base, isinstance(raw, str)
    if text and d.meta.parse_env is not None:  # DYN_LOG=debug; verbose = "debug" in a file
        return d.meta.parse_env(raw)
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if text and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise SpecError("expected true or false")
    if base is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if text and raw.strip().lstrip("-").isdigit():
            return int(raw)
        raise SpecError("expected an integer")
    if base is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if text:
            try:
                return float(raw)
            except ValueError:
                pass
        raise SpecError("expected a number")
    if not text:
        raise SpecError("expected a string")
    return Path(raw).expanduser() if base is Path else raw


def _check(d: Declared, value: Any) -> Any:
    """Range, choice and format checks; returns the value (choices as their enum)."""
    if value is None:
        return value
    m = d.meta
    if m.ge is not None and m.le is not None:
        if not m.ge <= value <= m.le:
            raise SpecError(f"must be between {m.ge:g} and {m.le:g}")
    elif m.ge is not None and not value >= m.ge:
        raise SpecError(
            "must be 0 or more" if (m.ge, d.base) == (0, int) else f"must be >= {m.ge:g}"
        )
    elif m.le is not None and not value <= m.le:
        raise SpecError(f"must be <= {m.le:g}")
    if m.gt is not None and not value > m.gt:
        raise SpecError("must be positive" if m.gt == 0 else f"must be > {m.gt:g}")
    names = d.choice_names()
    if names is not None:
        if str(value) not in names:
            raise SpecError(
                f"unknown {m.noun}{did_you_mean(str(value), names)}; choose {', '.join(names)}"
            )
        if issubclass(d.base, enum.Enum):
            value = d.base(str(value))
    if m.check is not None and (problem := m.check(value)) is not None:
        raise SpecError(problem)
    return value


def validate(settings: Settings) -> Settings:
    """Check every value against its declaration (choices become their enums), in place;
    the first bad one raises SpecError naming its flag."""
    for d in declared():
        value = getattr(settings, d.name)
        try:
            setattr(settings, d.name, _check(d, value))
        except SpecError as exc:
            raise SpecError(f"{d.flag} {value}: {exc}") from None
    return settings


# --- the layers ------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (anything else) file of settings -> {field: raw value}.
    Unknown keys, a missing file and bad syntax are SpecErrors naming the file."""
    where = f"--config {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{where}: no such file") from None
    except OSError as exc:
        raise SpecError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{where}: not UTF-8 text") from None
    loaded = (
        _parse_toml(text, where) if path.suffix.lower() == ".toml" else _parse_yaml(text, where)
    )
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SpecError(f"{where}: expected a table of settings (key = value)")
    keys = by_key()
    values: dict[str, Any] = {}
    for key, raw in loaded.items():
        d = keys.get(str(key))
        if d is None:
            known = [d.key for d in declared()]
            raise SpecError(
                f"{where}: unknown setting '{key}'{did_you_mean(str(key).replace('_', '-'), known)}"
            )
        values[d.name] = raw
    return values


def _parse_toml(text: str, where: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise SpecError(f"{where}: reading TOML needs tomli here: pip install tomli") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: invalid TOML: {' '.join(str(exc).split())}") from None


def _parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None


def resolve(
    given: Mapping[str, Any], env: Mapping[str, str], config: Path | None = None
) -> Settings:
    """Settings from the layers: ``given`` (the flags typed, by field name, already typed)
    over ``env`` over the ``config`` file over the defaults. Errors name their layer."""
    file_values = read_config_file(config) if config is not None else {}
    values: dict[str, Any] = {}
    for d in declared():
        if d.name in given:
            value, where = given[d.name], f"{d.flag} {given[d.name]}"
        elif d.meta.env and env.get(d.meta.env):
            raw = env[d.meta.env]
            where = f"{d.meta.env}={raw}"
            try:
                value = _coerce(d, raw)
            except SpecError as exc:
                raise SpecError(f"{where}: {exc}") from None
        elif d.name in file_values:
            raw = file_values[d.name]
            where = f"--config {config}: {d.key} = {raw!r}"
            try:
                value = _coerce(d, raw)
            except SpecError as exc:
                raise SpecError(f"{where}: {exc}") from None
        else:
            continue
        try:
            values[d.name] = _check(d, value)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
    return Settings(**values)
