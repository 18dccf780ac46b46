"""The whole-response bodies both ``in=http`` and ``in=batch`` send, and the helper that runs
a request's choices, with the real model card and the echo engine. Every body must be exactly
what the pydantic OpenAI model of its kind dumps (same keys, same order, same values)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import pytest
from pydantic import BaseModel
from strict_models import strict

from dynamo_run.echo import EchoEngine
from dynamo_run.errors import RequestError
from dynamo_run.pipeline.choices import complete_choices, expand_choices
from dynamo_run.pipeline.client import Completion, ModelClient
from dynamo_run.pipeline.responses import (
    TokenTexts,
    chat_completion_body,
    choices_usage,
    embedding_body,
    embedding_token_ids,
    text_completion_body,
)
from dynamo_run.protocol.internal import TokenLogprob
from dynamo_run.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
)


def assert_is_model_dump(model: type[BaseModel], body: dict) -> None:
    """``body`` is what ``model`` dumps, keys in the same order (compared as JSON text), and
    has no key the model does not define."""
    assert json.dumps(strict(model).model_validate(body).model_dump(mode="json")) == json.dumps(
        body
    )


@pytest.fixture()
def client(default_card) -> ModelClient:
    return ModelClient(default_card, EchoEngine(delay_ms=0))


def test_complete_choices_runs_prompts_times_n_in_api_order(client):
    prompts = client.preprocessor.completion(
        CompletionRequest(prompt=["one two three", "four five"], n=2, max_tokens=2)
    )
    seen: list[int] = []
    done = asyncio.run(
        complete_choices(client, expand_choices(prompts, 2), lambda i, d: seen.append(i))
    )
    assert [c.text for c in done] == ["one two", "one two", "four five", "four five"]
    assert [c.finish_reason for c in done] == ["length", "length", "stop", "stop"]
    assert [c.completion_tokens for c in done] == [2, 2, 2, 2]
    assert [c.prompt_tokens for c in done] == [3, 3, 2, 2]
    assert sorted(set(seen)) == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 2 and c.time_to_first_token is not None for c in done)
    # the same answer as the client's own single-choice path
    single = asyncio.run(client.complete(prompts[1]))
    assert (single.text, single.token_ids) == (done[2].text, done[2].token_ids)


def test_chat_body_is_the_pydantic_model_dump(client):
    prepared = client.preprocessor.chat(
        ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], n=2)
    )
    done = asyncio.run(complete_choices(client, expand_choices([prepared], 2)))
    body = chat_completion_body("chatcmpl-x", 7, "m", prepared, done)
    assert_is_model_dump(ChatCompletionResponse, body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": done[0].text}
    assert body["choices"][0]["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": prepared.prompt_tokens,
        "completion_tokens": 2 * prepared.prompt_tokens,
        "total_tokens": 3 * prepared.prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_logprobs_render_by_token_text_with_offsets(client, default_card):
    texts = TokenTexts(default_card.tokenizer)
    hello, world = (default_card.tokenizer.token_to_id(t) for t in ("Hello", "Ġworld"))
    items = [TokenLogprob(hello, -0.5, [(hello, -0.5), (world, -1.5)]), TokenLogprob(world, -0.25)]
    [prepared] = client.preprocessor.completion(CompletionRequest(prompt="Say"))
    result = Completion("Hello world", "length", 1, 2, logprobs=items)
    no_logprobs = Completion("x", "stop", 1, 1)

    chat = chat_completion_body("c", 1, "m", prepared, [result, no_logprobs], texts, 1)
    assert_is_model_dump(ChatCompletionResponse, chat)
    assert chat["choices"][0]["logprobs"]["content"] == [
        {
            "token": "Hello",
            "logprob": -0.5,
            "bytes": list(b"Hello"),
            "top_logprobs": [{"token": "Hello", "logprob": -0.5, "bytes": list(b"Hello")}],
        },
        {"token": " world", "logprob": -0.25, "bytes": list(b" world"), "top_logprobs": []},
    ]
    assert chat["choices"][1]["logprobs"] is None  # the engine gave none for this choice

    cmpl = text_completion_body("t", 1, "m", [prepared], [result], True, texts, 2)
    assert_is_model_dump(CompletionResponse, cmpl)
    assert cmpl["choices"][0]["text"] == "SayHello world"  # echo puts the prompt first
    assert cmpl["choices"][0]["logprobs"] == {
        "tokens": ["Hello", " world"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"Hello": -0.5, " world": -1.5}, {}],
        "text_offset": [3, 8],  # after the echoed prompt
    }


def test_usage_counts_each_prompt_and_its_cache_once(client):
    prompts = client.preprocessor.completion(CompletionRequest(prompt=["a b", "c d e"]))
    results = {
        0: Completion("", "stop", 2, 3, cached_tokens=1),
        1: Completion("", "stop", 2, 4, cached_tokens=2),
        2: Completion("", "stop", 3, 5, cached_tokens=3),
    }  # choice 3 (prompt 1, choice 1) has not answered yet
    usage = choices_usage(prompts, 2, results)
    p = sum(x.prompt_tokens for x in prompts)
    assert usage == {
        "prompt_tokens": p,
        "completion_tokens": 12,
        "total_tokens": p + 12,
        "prompt_tokens_details": {"cached_tokens": 2 + 3},
    }


def test_embedding_body_and_input_checks(client, default_card):
    assert embedding_token_ids(client, EmbeddingRequest(input="hello")) == [
        client.preprocessor.encode("hello")
    ]
    assert embedding_token_ids(client, EmbeddingRequest(input=[4, 5])) == [[4, 5]]
    req = EmbeddingRequest(input=[[4, 5], [1, 2, 3]], encoding_format="base64")
    ids = embedding_token_ids(client, req)
    assert ids == [[4, 5], [1, 2, 3]]
    vectors = [[0.5, -1.0], [0.25, 2.0]]
    body = embedding_body("m", req, ids, vectors)
    assert_is_model_dump(EmbeddingResponse, body)
    decoded = struct.unpack("<2f", base64.b64decode(body["data"][1]["embedding"]))
    assert list(decoded) == [0.25, 2.0]
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    floats = embedding_body("m", EmbeddingRequest(input="x"), [[1]], [[0.5, -1.0]])
    assert floats["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}]

    with pytest.raises(RequestError, match="dimensions=3") as err:
        embedding_body("m", EmbeddingRequest(input="x", dimensions=3), [[1]], [[0.5, -1.0]])
    assert err.value.param == "dimensions"
    vocab = default_card.tokenizer.get_vocab_size()
    for bad, message in (
        ([], "input is empty"),
        ([""], "empty string"),
        ([[vocab]], "outside the vocabulary"),
        ([[1] * (default_card.context_length + 1)], "maximum context length"),
    ):
        with pytest.raises(RequestError, match=message) as err:
            embedding_token_ids(client, EmbeddingRequest(input=bad))
        assert err.value.param == "input"


def test_strict_models_reject_a_misspelt_key_the_protocol_models_ignore():
    from pydantic import ValidationError

    from dynamo_run.protocol.openai import ChatCompletionChunk

    chunk = {
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }  # fmt: skip
    strict(ChatCompletionChunk).model_validate(chunk)
    chunk["choices"][0]["delta"] = {"contnet": "x"}  # misspelt, nested two levels down
    ChatCompletionChunk.model_validate(chunk)  # the protocol model lets it pass
    with pytest.raises(ValidationError, match="contnet"):
        strict(ChatCompletionChunk).model_validate(chunk)
