"""The whole pipeline (template -> tokens -> engine -> detokeniser -> stop rules) with the
echo engine, whose output is exactly the prompt's text, so every assertion is exact."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_run.echo import EchoEngine
from dynamo_run.errors import RequestError
from dynamo_run.pipeline.client import ModelClient, copy_for_choice
from dynamo_run.protocol.openai import ChatCompletionRequest, CompletionRequest

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(content: str, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": content}], **fields)


@pytest.fixture()
def client(default_card) -> ModelClient:
    return ModelClient(default_card, EchoEngine(delay_ms=0))


def test_chat_echoes_the_rendered_prompt_without_specials(client):
    prepared = client.preprocessor.chat(chat("Hello there"))
    result = asyncio.run(client.complete(prepared))
    assert result.text == f"system\n{SYSTEM}\nuser\nHello there\nassistant\n"
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == prepared.prompt_tokens
    assert result.completion_tokens == prepared.prompt_tokens  # echo returns every token


def test_completion_prompt_text_round_trips(client):
    text = "naïve café 🚀  two spaces"
    [prepared] = client.preprocessor.completion(CompletionRequest(prompt=text))
    assert asyncio.run(client.complete(prepared)).text == text


def test_max_tokens_gives_length(client):
    [prepared] = client.preprocessor.completion(
        CompletionRequest(prompt="one two three four five", max_tokens=2)
    )
    result = asyncio.run(client.complete(prepared))
    assert result.text == "one two"
    assert result.finish_reason == "length"
    assert result.completion_tokens == 2


def test_max_completion_tokens_wins_over_max_tokens(client):
    prepared = client.preprocessor.chat(chat("hi", max_tokens=50, max_completion_tokens=3))
    assert prepared.engine_request.stop.max_tokens == 3


def test_stop_string_cuts_and_finishes(client):
    [prepared] = client.preprocessor.completion(
        CompletionRequest(prompt="alpha beta STOP gamma", stop="STOP")
    )
    result = asyncio.run(client.complete(prepared))
    assert result.text == "alpha beta "
    assert result.finish_reason == "stop"


def test_sampling_fields_reach_the_engine_request(client):
    prepared = client.preprocessor.chat(
        chat(
            "x",
            temperature=0.3,
            top_p=0.9,
            top_k=20,
            min_p=0.05,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            repetition_penalty=1.1,
        )
    )
    s = prepared.engine_request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.3, 0.9, 20, 0.05, 7)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, 0.25, 1.1)
    assert prepared.engine_request.stop.stop_token_ids == [2]


def test_prompt_over_context_is_rejected(default_card):
    from dynamo_run.model.card import load_model_card

    small = load_model_card(None, context_length=32)
    client = ModelClient(small, EchoEngine(delay_ms=0))
    with pytest.raises(RequestError) as err:
        client.preprocessor.chat(chat("word " * 100))
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 32 tokens" in str(err.value)


def test_max_tokens_is_clamped_to_the_room_left(default_card):
    from dynamo_run.model.card import load_model_card

    small = load_model_card(None, context_length=64)
    client = ModelClient(small, EchoEngine(delay_ms=0))
    prepared = client.preprocessor.chat(chat("hi", max_tokens=1000))
    assert prepared.engine_request.stop.max_tokens == 64 - prepared.prompt_tokens


def test_request_template_defaults_merge_under_request(default_card):
    client = ModelClient(default_card, EchoEngine(0), {"temperature": 0.1, "max_tokens": 9})
    merged = client.preprocessor.apply_template(
        {"messages": [], "max_tokens": 3, "temperature": None}
    )
    assert merged == {"messages": [], "max_tokens": 3, "temperature": 0.1}


def test_consumer_closing_cancels_the_engine(default_card):
    engine = EchoEngine(delay_ms=20)
    client = ModelClient(default_card, engine)

    async def scenario() -> int:
        prepared = client.preprocessor.chat(chat("a long prompt " * 20))
        stream = client.stream(prepared)
        await stream.__anext__()
        assert engine.in_flight == 1
        await stream.aclose()
        return engine.in_flight

    assert asyncio.run(scenario()) == 0


def test_task_cancellation_reaches_the_engine(default_card):
    engine = EchoEngine(delay_ms=20)
    client = ModelClient(default_card, engine)

    async def scenario() -> int:
        prepared = client.preprocessor.chat(chat("cancel me " * 20))
        task = asyncio.create_task(client.complete(prepared))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.in_flight

    assert asyncio.run(scenario()) == 0


def test_choices_get_their_own_id_and_seed(client):
    prepared = client.preprocessor.chat(chat("x", seed=10))
    second = copy_for_choice(prepared, 1)
    assert second.engine_request.request_id != prepared.engine_request.request_id
    assert second.engine_request.sampling.seed == 11
    assert second.engine_request.token_ids == prepared.engine_request.token_ids


def test_template_error_is_a_request_error(default_card):
    from dynamo_run.model.template import ChatTemplate

    client = ModelClient(default_card, EchoEngine(0))
    client.card = default_card
    client.preprocessor.card.chat_template, original = (
        ChatTemplate("{{ raise_exception('roles must alternate') }}"),
        default_card.chat_template,
    )
    try:
        with pytest.raises(RequestError, match="roles must alternate"):
            client.preprocessor.chat(chat("x"))
    finally:
        default_card.chat_template = original
