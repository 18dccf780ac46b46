"""The typer app: argv -> RunSpec -> runner. Nothing else lives here.

Usage errors are printed as one line on stderr with exit code 2; start-up failures (model,
engine) as one line with exit code 1. Heavy modules are imported only after parsing, so
``--help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from dynamo_run import __version__

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


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING
    dyn_log = os.environ.get("DYN_LOG", "").split(",")[0].strip().upper()
    if dyn_log in ("ERROR", "WARN", "WARNING", "INFO", "DEBUG"):
        level = getattr(logging, "WARNING" if dyn_log == "WARN" else dyn_log)
    if dyn_log == "TRACE":
        level = logging.DEBUG
    if verbosity == 1:
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command(epilog=_epilog(), no_args_is_help=False)
def run(
    specs: Annotated[
        list[str] | None,
        typer.Argument(help="in=INPUT, out=OUTPUT and MODEL, in any order.", show_default=False),
    ] = None,
    model_path: Annotated[str | None, typer.Option(help="MODEL, as a flag.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Name to serve the model as.")] = None,
    context_length: Annotated[
        int | None, typer.Option(help="Limit the context (tokens); default: the model's.")
    ] = None,
    kv_cache_block_size: Annotated[int | None, typer.Option(help="KV cache block size.")] = None,
    tensor_parallel_size: Annotated[
        int | None,
        typer.Option(help="vllm, sglang, trtllm: GPUs to split the model over."),
    ] = None,
    http_host: Annotated[str, typer.Option(help="in=http: address to bind.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="in=http: port to bind.")] = 8000,
    grpc_host: Annotated[str, typer.Option(help="in=grpc: address to bind.")] = "127.0.0.1",
    grpc_port: Annotated[
        int, typer.Option(help="in=grpc: port to bind (Triton's gRPC port).")
    ] = 8001,
    tls_cert_path: Annotated[
        Path | None, typer.Option(help="in=http/grpc: TLS certificate.")
    ] = None,
    tls_key_path: Annotated[
        Path | None, typer.Option(help="in=http/grpc: TLS private key.")
    ] = None,
    migration_limit: Annotated[
        int, typer.Option(help="Retries of a request on another worker.")
    ] = 0,
    router_mode: Annotated[
        str, typer.Option(help="out=dyn: random | round-robin | kv.")
    ] = "round-robin",
    kv_overlap_score_weight: Annotated[
        float,
        typer.Option(
            help="--router-mode kv: weight of the prefill a cached prefix saves (0: load only)."
        ),
    ] = 1.0,
    router_temperature: Annotated[
        float,
        typer.Option(help="--router-mode kv: 0 picks the cheapest worker; > 0 samples by cost."),
    ] = 0.0,
    kv_events: Annotated[
        bool,
        typer.Option(help="--router-mode kv: use the workers' KV events (else predict caches)."),
    ] = True,
    router_replica_sync: Annotated[
        bool,
        typer.Option(help="--router-mode kv: frontends share the load they put on each worker."),
    ] = False,
    max_inflight_per_worker: Annotated[
        int | None,
        typer.Option(
            help="in=http: requests a worker takes at once (default: its decode slots; 0: no limit)."
        ),
    ] = None,
    request_queue_limit: Annotated[
        int | None,
        typer.Option(
            help="in=http: requests that wait for a busy model before 503 (default: twice its capacity)."
        ),
    ] = None,
    active_decode_blocks_threshold: Annotated[
        float | None,
        typer.Option(
            help="in=http: a worker whose KV blocks are this full (0-1) is busy (default: off)."
        ),
    ] = None,
    extra_engine_args: Annotated[
        Path | None, typer.Option(help="JSON file of engine-specific arguments.")
    ] = None,
    request_template: Annotated[
        Path | None, typer.Option(help="JSON file of defaults merged into every request.")
    ] = None,
    generation_config: Annotated[
        str,
        typer.Option(
            help="auto: unset sampling fields take the model's defaults, then llama.cpp's "
            "(temperature 0.8, top_k 40, top_p 0.95, min_p 0.05); none: OpenAI's (temperature 1)."
        ),
    ] = "auto",
    nats_url: Annotated[
        str | None,
        typer.Option(
            envvar="NATS_SERVER",
            help="An existing NATS server or cluster; default: the embedded one, shared per host.",
        ),
    ] = None,
    nats_token: Annotated[
        str | None, typer.Option(envvar="NATS_TOKEN", help="Token for the NATS server.")
    ] = None,
    nats_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT: make the embedded NATS server reachable from other hosts "
            "(requires a token; one is generated if --nats-token is not given)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="DYN_API_KEY", help="in=http/grpc: require this key.")
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="in=text: answer this and exit.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="in=batch: output file (default output.jsonl).")
    ] = None,
    batch_concurrency: Annotated[
        int | None, typer.Option(help="in=batch: requests in flight.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="in=batch: start afresh.")] = False,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="Parse tool calls in answers: hermes | llama3_json | mistral | pythonic | json "
            "(default: detected from the chat template when unambiguous)."
        ),
    ] = None,
    reasoning_parser: Annotated[
        str | None,
        typer.Option(help="Split <think> reasoning into reasoning_content: deepseek_r1 | qwen3."),
    ] = None,
    chat_template: Annotated[
        Path | None,
        typer.Option(help="A jinja chat template file replacing the model's own."),
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug (or DYN_LOG).")
    ] = 0,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show version."),
    ] = None,
) -> None:
    """[bold]dynamo-run[/]: chat with, serve, or batch-run an LLM with one command."""
    from dynamo_run.spec import Flags, SpecError, parse_run_spec

    flags = Flags(
        model_path=model_path,
        model_name=model_name,
        context_length=context_length,
        kv_cache_block_size=kv_cache_block_size,
        tensor_parallel_size=tensor_parallel_size,
        http_host=http_host,
        http_port=http_port,
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        tls_cert_path=tls_cert_path,
        tls_key_path=tls_key_path,
        migration_limit=migration_limit,
        router_mode=router_mode,
        kv_overlap_score_weight=kv_overlap_score_weight,
        router_temperature=router_temperature,
        kv_events=kv_events,
        router_replica_sync=router_replica_sync,
        max_inflight_per_worker=max_inflight_per_worker,
        request_queue_limit=request_queue_limit,
        active_decode_blocks_threshold=active_decode_blocks_threshold,
        extra_engine_args=extra_engine_args,
        request_template=request_template,
        generation_config=generation_config,
        nats_url=nats_url,
        nats_token=nats_token,
        nats_listen=nats_listen,
        api_key=api_key,
        verbosity=verbose,
        prompt=prompt,
        output=output,
        batch_concurrency=batch_concurrency,
        overwrite=overwrite,
        tool_call_parser=tool_call_parser,
        reasoning_parser=reasoning_parser,
        chat_template=chat_template,
    )
    try:
        spec = parse_run_spec(list(specs or []), flags)
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
