"""Grammar-constrained decoding in the llamacpp engine: schema grammars, and the greedy
fast path (argmax checked against the grammar first) giving the same tokens as the full
grammar pass."""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.model
llamacpp = pytest.importorskip("dynamo_run_llamacpp")

from dynamo_run_llamacpp import sampling  # noqa: E402
from dynamo_run_llamacpp.grammar import SchemaError, schema_grammar  # noqa: E402

from dynamo_run.engine import EngineConfig  # noqa: E402
from dynamo_run.protocol.internal import (  # noqa: E402
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_schema_grammar_is_cached_and_strict_about_control_characters() -> None:
    first = schema_grammar(SCHEMA)
    assert schema_grammar(json.loads(json.dumps(SCHEMA))) is first  # cached by content
    assert "\\x00-\\x1F" in first  # no raw control characters inside strings
    with pytest.raises(SchemaError):
        schema_grammar({"type": "no-such-type"})


def _answer(engine, card, sampling_opts: SamplingOptions) -> list[int]:
    prompt = card.chat_template.render([{"role": "user", "content": "Describe a person."}])
    request = PreprocessedRequest(
        request_id="g",
        token_ids=card.tokenizer.encode(prompt, add_special_tokens=False).ids,
        sampling=sampling_opts,
        stop=StopConditions(max_tokens=60, stop_token_ids=card.stop_token_ids),
    )

    async def run() -> list[int]:
        return [t async for out in engine.generate(request) for t in out.token_ids]

    return asyncio.run(run())


def test_greedy_fast_path_matches_the_full_grammar_pass(default_card, monkeypatch) -> None:
    engine = llamacpp.create_engine(default_card, EngineConfig(context_length=2048))
    try:
        opts = SamplingOptions(temperature=0.0, json_schema=SCHEMA)
        fast = _answer(engine, default_card, opts)
        counters = dict(engine.stats())
        assert counters["grammar_argmax_ok"] > 0 and counters["grammar_full_pass"] > 0
        monkeypatch.setattr(
            "dynamo_run_llamacpp.scheduler.greedy_under_grammar", lambda opts: False
        )
        full = _answer(engine, default_card, opts)
        assert engine.stats()["grammar_argmax_ok"] == counters["grammar_argmax_ok"]
        assert fast == full
        text = default_card.tokenizer.decode(fast)
        assert set(json.loads(text)) == {"name", "age"}
    finally:
        asyncio.run(engine.close())
    assert sampling.greedy_under_grammar(SamplingOptions(temperature=0.0, json_object=True))
    assert not sampling.greedy_under_grammar(SamplingOptions(temperature=0.7, json_object=True))
