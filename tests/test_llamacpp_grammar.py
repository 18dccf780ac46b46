"""Grammar-constrained decoding in the llamacpp engine: schema grammars, and the fast path
(the unconstrained choice checked against the grammar first) giving the same greedy tokens
as a grammar pass over the whole vocabulary every step."""

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


def test_fast_path_matches_the_full_grammar_pass(default_card) -> None:
    engine = llamacpp.create_engine(default_card, EngineConfig(context_length=2048))
    picker = engine.scheduler._picker
    try:
        opts = SamplingOptions(temperature=0.0, json_schema=SCHEMA)
        fast = _answer(engine, default_card, opts)
        stats = engine.stats()
        assert stats["grammar_first_choice_ok"] > 0 and stats["grammar_full_passes"] > 0
        picker.allows = lambda grammar, token: False  # every step: the full pass
        try:
            full = _answer(engine, default_card, opts)
        finally:
            del picker.allows
        assert fast == full
        assert set(json.loads(default_card.tokenizer.decode(fast))) == {"name", "age"}
        # Sampled (with penalties): still JSON for the schema.
        opts = SamplingOptions(temperature=0.8, seed=3, repetition_penalty=1.1, json_schema=SCHEMA)
        sampled = default_card.tokenizer.decode(_answer(engine, default_card, opts))
        assert set(json.loads(sampled)) == {"name", "age"}
        obj = SamplingOptions(temperature=0.5, seed=1, json_object=True)
        assert isinstance(
            json.loads(default_card.tokenizer.decode(_answer(engine, default_card, obj))), dict
        )
    finally:
        asyncio.run(engine.close())
    assert (
        sampling.grammar_for(SamplingOptions(json_object=True), None) == sampling.JSON_OBJECT_GBNF
    )
    assert not sampling.needs_chain(SamplingOptions(temperature=0.0, json_object=True))


def test_finished_grammar_stops_on_any_end_of_generation_token(default_card) -> None:
    """Without the chat template the model ends a forced call with <|endoftext|>, not the
    card's <|im_end|>: the answer still stops there instead of running to max_tokens."""
    from dynamo_run.pipeline.chat_plan import call_schema
    from dynamo_run.protocol.internal import FINISH_STOP

    engine = llamacpp.create_engine(default_card, EngineConfig(context_length=2048))
    schema = call_schema(
        {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    )
    prompt = default_card.tokenizer.encode("Add 2 and 3.", add_special_tokens=False).ids

    async def run(seed: int) -> list:
        request = PreprocessedRequest(
            request_id=f"eog-{seed}",
            token_ids=prompt,
            sampling=SamplingOptions(temperature=0.2, top_p=0.9, seed=seed, json_schema=schema),
            stop=StopConditions(max_tokens=120, stop_token_ids=default_card.stop_token_ids),
        )
        return [out async for out in engine.generate(request)]

    try:
        runs = [asyncio.run(run(seed)) for seed in range(4)]
    finally:
        asyncio.run(engine.close())
    ends = ("<|endoftext|>", "<|im_end|>")
    for outs in runs:
        tokens = [default_card.tokenizer.id_to_token(t) for o in outs for t in o.token_ids]
        assert outs[-1].finish_reason == FINISH_STOP
        assert tokens[-1] in ends and not any(t in ends for t in tokens[:-1]), tokens
