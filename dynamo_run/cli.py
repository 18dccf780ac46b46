"""The typer app: argv -> RunSpec -> runner. Nothing else lives here.

Its options are generated from the settings declared in ``settings.py`` (``settings_cli``:
one typer option per field, in that field's help panel), then layered over the environment
and the ``--config`` file (``settings.resolve``).

Usage errors are printed as one line on stderr with exit code 2; start-up failures (model,
engine) as one line with exit code 1. Heavy modules are imported only after parsing, so
``--help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from dynamo_run import __version__
from dynamo_run.click_compat import click_errors
from dynamo_run.settings import SpecError, python_log_level
from dynamo_run.settings_cli import ConfigOption, resolve_settings, with_settings

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


def _setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=python_log_level(verbosity),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command(epilog=_epilog(), no_args_is_help=False)
@with_settings()
def run(
    ctx: typer.Context,
    specs: Annotated[
        list[str] | None,
        typer.Argument(help="in=INPUT, out=OUTPUT and MODEL, in any order.", show_default=False),
    ] = None,
    config: ConfigOption = None,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show version."),
    ] = None,
    **settings: Any,
) -> None:
    """[bold]dynamo-run[/]: chat with, serve, or batch-run an LLM with one command."""
    from dynamo_run.spec import parse_run_spec

    try:
        spec = parse_run_spec(list(specs or []), resolve_settings(ctx, settings, config))
    except SpecError as exc:
        _fail(str(exc), 2)
    _setup_logging(spec.flags.verbosity)

    from dynamo_run.errors import RunError
    from dynamo_run.runner import run

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
