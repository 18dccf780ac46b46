"""The typer app: argv -> RunSpec -> runner. Nothing else lives here.

Its options are generated from the settings declared in ``settings.py`` (one typer option
per field, in that field's help panel); the environment and ``--config`` layers are applied
there too (``settings.resolve``).

Usage errors are printed as one line on stderr with exit code 2; start-up failures (model,
engine) as one line with exit code 1. Heavy modules are imported only after parsing, so
``--help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dynamo_run import __version__
from dynamo_run.settings import Declared, SpecError, declared, python_log_level, resolve

try:  # typer >= 0.20 vendors its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

EXAMPLES = """\
[bold]Inputs[/]  in=text (default) | in=http | in=grpc | in=http,grpc | in=batch:FILE.jsonl
        | in=dyn://ns.component.endpoint
[bold]Outputs[/] out=auto (default) | echo | mocker | llamacpp | vllm | sglang | trtllm
        | dyn | dyn://ns.component.endpoint
[bold]MODEL[/]   a GGUF file, a Hugging Face folder, or a Hugging Face repo id; default: SmolLM2-135M-Instruct

[bold]Installed engines[/]: {engines}

[bold]Examples[/]
  dynamo-run                                      chat with the default model
  dynamo-run in=text out=llamacpp model.gguf      chat with a GGUF model
  dynamo-run out=vllm Qwen/Qwen3-0.6B             chat through vLLM (HF model)
  echo "Why is the sky blue?" | dynamo-run        answer one question and exit
  dynamo-run in=http out=llamacpp --http-port 8080    OpenAI-compatible server
  dynamo-run in=grpc out=llamacpp                 KServe v2 / Triton gRPC server on :8001
  dynamo-run in=batch:prompts.jsonl out=auto      run a JSONL file, write output.jsonl
  dynamo-run in=dyn://ns.backend.generate out=llamacpp   serve the model as a worker
  dynamo-run in=http out=dyn                      frontend for every worker found
  dynamo-run ps                                   list the live workers
"""


def _engines_line() -> str:
    """Installed engines, each marked with why it cannot run here if it cannot."""
    from dynamo_run.engine import engine_usability

    usability = engine_usability()
    parts = [
        name if reason is None else f"{name} (not usable: {reason})"
        for name, reason in sorted(usability.items())
    ]
    return ", ".join(parts) or "none"


def _epilog() -> str:
    from rich.markup import escape

    return EXAMPLES.format(engines=escape(_engines_line()))


app = typer.Typer(
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dynamo-run {__version__}")
        typer.echo(f"engines: {_engines_line()}")
        raise typer.Exit()


def _option(d: Declared, names: tuple[str, ...], help_text: str) -> tuple[Any, Any]:
    """The typer option of one declared setting: (annotation, default shown in help)."""
    m = d.meta
    choices = d.choice_names()
    if choices:
        help_text += f" One of: {', '.join(choices)}."
    if m.env:
        help_text += f" \\[env var: {m.env}]"
    if d.base is bool:  # a flag; --no-NAME is a hidden twin (a second column cuts names)
        show: Any = m.default_help or ("on" if d.default else "off")
        return Annotated[
            bool,
            typer.Option(*names, help=help_text, rich_help_panel=str(m.panel), show_default=show),
        ], False
    default = d.default if d.default is None or d.base in (int, float) else str(d.default)
    base = int if m.count else str if choices else d.base
    option = typer.Option(
        *names,
        help=help_text,
        rich_help_panel=str(m.panel),
        metavar=m.metavar or ("MODE" if choices else None),
        count=m.count,
        show_default=m.default_help or (not m.count and default is not None),
    )
    return Annotated[base if default is not None else base | None, option], default


def _negation(d: Declared) -> str:
    return f"no_{d.name}"


def _build_run(func: Callable[..., None]) -> Callable[..., None]:
    """Give ``func(ctx, specs, config, version, **settings)`` one typer option per declared
    setting (and a hidden ``--no-NAME`` per flag), so the command line is generated from
    settings.py."""
    signature = inspect.signature(func, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]

    def add(name: str, annotation: Any, default: Any) -> None:
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(name, kind, default=default, annotation=annotation))

    for d in declared():
        names = d.meta.flags or (d.flag,)
        help_text = d.meta.help
        if d.base is bool:
            help_text += f" --no-{d.key} turns it off."
        add(d.name, *_option(d, names, help_text))
        if d.base is bool:
            add(_negation(d), Annotated[bool, typer.Option(f"--no-{d.key}", hidden=True)], False)
    func.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The settings typed on the command line (not defaulted), by field name."""

    def typed(name: str) -> bool:
        return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"

    given = {}
    for d in declared():
        if d.base is bool and typed(_negation(d)):
            if typed(d.name):
                raise SpecError(f"{d.flag} and --no-{d.key} both given; choose one")
            given[d.name] = False
        elif typed(d.name):
            given[d.name] = values[d.name]
    return given


def _setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=python_log_level(verbosity),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command(epilog=_epilog(), no_args_is_help=False)
@_build_run
def run(
    ctx: typer.Context,
    specs: Annotated[
        list[str] | None,
        typer.Argument(help="in=INPUT, out=OUTPUT and MODEL, in any order.", show_default=False),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="TOML (.toml) or YAML file of settings, keyed by flag name "
            "(http-port = 8080). Flags and environment variables override it.",
        ),
    ] = None,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show version."),
    ] = None,
    **settings: Any,
) -> None:
    """[bold]dynamo-run[/]: chat with, serve, or batch-run an LLM with one command."""
    from dynamo_run.spec import parse_run_spec

    try:
        given = _given(ctx, settings)
        spec = parse_run_spec(list(specs or []), resolve(given, os.environ, config))
    except SpecError as exc:
        _fail(str(exc), 2)
    _setup_logging(spec.flags.verbosity)

    from dynamo_run.runner import RunError, run

    try:
        code = run(spec)
    except RunError as exc:
        _fail(str(exc), 1)
    except SpecError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _fail(message: str, code: int) -> None:
    print(f"dynamo-run: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Click usage errors become one line and exit code 2."""
    supervisor_argv = sys.argv[1:] if argv is None else argv
    if supervisor_argv[:1] == ["__nats-supervisor"]:  # how a frozen binary runs it
        from dynamo_run.distributed.nats_supervisor import main as nats_supervisor_main

        return nats_supervisor_main(supervisor_argv[1:])
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ps"]:  # `dynamo-run ps`: the live workers (like `ollama ps`)
        from dynamo_run.ps import main as ps_main

        return ps_main(args[1:])
    try:
        result = app(args=argv, prog_name="dynamo-run", standalone_mode=False)
    except click_errors.NoArgsIsHelpError:
        return 0
    except click_errors.UsageError as exc:
        message = exc.format_message().replace("\n", " ")
        print(f"dynamo-run: error: {message}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return 130
    except Exception as exc:  # last resort: one line, details only with -vv
        logging.getLogger("dynamo_run").debug("unexpected error", exc_info=True)
        print(f"dynamo-run: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
