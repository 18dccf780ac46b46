"""``in=batch`` with the real default model through ``out=llamacpp`` (all three forms,
embeddings included), run as a real process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

pytest.importorskip("dynamo_run_llamacpp")

pytestmark = pytest.mark.model

GREEDY = {"temperature": 0, "max_tokens": 12}


def test_batch_with_the_default_model(tmp_path: Path) -> None:
    def openai(custom_id: str, url: str, body: dict[str, object]) -> dict[str, object]:
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}

    questions = ["What is 2+2?", "Name a colour.", "Say hello.", "What is the capital of France?"]
    rows: list[dict[str, object]] = [{"text": q, **GREEDY} for q in questions]
    rows += [
        {"messages": [{"role": "user", "content": "Hi"}], **GREEDY},
        openai(
            "chat",
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "logprobs": True,
                "top_logprobs": 2,
                **GREEDY,
            },
        ),
        openai("cmpl", "/v1/completions", {"prompt": "Once upon a time", **GREEDY}),
        openai("emb", "/v1/embeddings", {"input": ["hello", "world"]}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = run_cli(f"in=batch:{inp}", "out=llamacpp", timeout=300)  # engine max_concurrency
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert len(out) == len(rows)

    for i, record in enumerate(out[:5]):
        assert record["line"] == i + 1 and record["error"] is None
        assert isinstance(record["response"], str) and record["response"].strip()
        assert 0 < record["tokens_out"] <= 12 and record["tokens_in"] > 20
        assert record["finish_reason"] in ("stop", "length")
    assert out[0]["text"] == questions[0]

    chat = out[5]["response"]["body"]
    assert chat["choices"][0]["message"]["content"]
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)

    cmpl = out[6]["response"]["body"]
    assert cmpl["object"] == "text_completion" and cmpl["choices"][0]["text"]

    emb = out[7]["response"]["body"]
    assert [d["index"] for d in emb["data"]] == [0, 1]
    vectors = [d["embedding"] for d in emb["data"]]
    assert len(vectors[0]) == len(vectors[1]) > 100
    assert math.isclose(math.sqrt(sum(v * v for v in vectors[0])), 1.0, rel_tol=1e-3)
    assert vectors[0] != vectors[1]

    summary = result.stderr
    assert f"batch: {len(rows)} of {len(rows)} lines: {len(rows)} ok, 0 failed" in summary
