"""``dynamo-run in=http out=echo`` driven with the official ``openai`` client.

The echo engine streams the prompt's own tokens back, so every answer is known exactly.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from http_helpers import MODEL_NAME, Server, echo_server_fixture, metric  # noqa: F401
from strict_models import validate_json

from dynamo_run.model.generation_defaults import DEFAULT_MODEL_SOURCE
from dynamo_run.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
)

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(echo_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=echo_server.url, api_key="unused", max_retries=0)


# --- completions ------------------------------------------------------------------------


def test_completion_echoes_prompt(client: openai.OpenAI) -> None:
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPT)
    assert res.id.startswith("cmpl-")
    assert res.object == "text_completion"
    assert res.model == MODEL_NAME
    assert res.created > 0
    [choice] = res.choices
    assert choice.text == PROMPT
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert res.usage is not None
    assert res.usage.prompt_tokens == res.usage.completion_tokens == 9
    assert res.usage.total_tokens == 18
    assert res.usage.prompt_tokens_details is not None
    assert res.usage.prompt_tokens_details.cached_tokens == 0


def test_completion_max_tokens_gives_length(client: openai.OpenAI) -> None:
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert res.choices[0].text == "The quick"
    assert res.choices[0].finish_reason == "length"
    assert res.usage is not None and res.usage.completion_tokens == 2


def test_completion_streamed_matches_whole(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == PROMPT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 9
    assert all(c.id == chunks[0].id for c in chunks)


def test_completion_stop_string(client: openai.OpenAI) -> None:
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=[" jumps", "zzz"])
    assert res.choices[0].text == "The quick brown fox"
    assert res.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=" over", stream=True)
    assert "".join(c.choices[0].text for c in stream) == "The quick brown fox jumps"


def test_completion_echo_and_batch_of_prompts(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model=MODEL_NAME, prompt=["one two", "three"], echo=True, n=2, max_tokens=1
    )
    texts = [(c.index, c.text) for c in res.choices]
    assert texts == [(0, "one twoone"), (1, "one twoone"), (2, "threethree"), (3, "threethree")]
    assert res.usage is not None
    assert res.usage.prompt_tokens == 3 and res.usage.completion_tokens == 4


def test_completion_echo_streamed(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL_NAME, prompt=["one two", "three"], echo=True, max_tokens=1, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == {0: "one twoone", 1: "threethree"}


def test_completion_token_prompt(client: openai.OpenAI) -> None:
    ids = [504, 2365, 6354]  # "The quick brown"
    res = client.completions.create(model=MODEL_NAME, prompt=ids)
    assert res.choices[0].text == "The quick brown"


# --- chat -------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hello world"}]


def test_chat_whole(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
    assert res.id.startswith("chatcmpl-")
    assert res.object == "chat.completion"
    [choice] = res.choices
    assert choice.message.role == "assistant"
    # The echo engine returns the templated prompt; special tokens are not shown.
    assert choice.message.content is not None
    assert choice.message.content.endswith("user\nhello world\nassistant\n")
    assert choice.finish_reason == "stop"
    assert res.usage is not None and res.usage.prompt_tokens == res.usage.completion_tokens
    assert res.usage.prompt_tokens_details is not None
    assert res.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streamed_with_usage(client: openai.OpenAI, echo_server: Server) -> None:
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


def test_stream_wire_format(echo_server: Server) -> None:
    """Raw SSE: every event parses as our chunk model, and the stream ends with [DONE]."""
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 4}  # <|im_start|> shows as ""
    with httpx.stream("POST", echo_server.url + "/chat/completions", json=body) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        events = [line for line in res.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [validate_json(ChatCompletionChunk, e.removeprefix("data: ")) for e in events[:-1]]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "length"]
    body = {"prompt": PROMPT, "stream": True, "max_tokens": 2}
    with httpx.stream("POST", echo_server.url + "/completions", json=body) as res:
        events = [line for line in res.iter_lines() if line]
    for event in events[:-1]:
        validate_json(CompletionResponse, event.removeprefix("data: "))


@pytest.mark.parametrize(
    ("path", "body", "model", "whole"),
    [
        ("/chat/completions", {"messages": MESSAGES}, ChatCompletionChunk, ChatCompletionResponse),
        ("/completions", {"prompt": [PROMPT, "two"], "echo": True}, CompletionResponse, CompletionResponse),
    ],
)  # fmt: skip
def test_every_event_and_body_has_only_known_keys(echo_server: Server, path, body, model, whole):
    """Raw JSON, streamed (n, usage, logprobs asked for) and whole, against strict models:
    a misspelt key fails here rather than pass as an unknown one."""
    extra = {"n": 2, "max_tokens": 3, "logprobs": 2 if path == "/completions" else True}
    if path == "/chat/completions":
        extra["top_logprobs"] = 2
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", echo_server.url + path, json={**body, **extra, **stream}) as res:
        events = [line for line in res.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [validate_json(model, e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    res = httpx.post(echo_server.url + path, json={**body, **extra})
    assert res.status_code == 200
    validate_json(whole, res.content)
    error = httpx.post(echo_server.url + path, json={**body, "max_tokens": -1})
    assert error.status_code == 400
    validate_json(ErrorResponse, error.content)


def test_chat_n_choices(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=2, max_tokens=4)
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[0].message.content == res.choices[1].message.content
    assert res.usage is not None and res.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, n=2, max_tokens=4, stream=True
    )
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1] == res.choices[0].message.content


def test_chat_sampling_fields_and_unknown_fields_accepted(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_completion_tokens=2,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="someone",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "vendor_thing": 1},
    )
    assert res.choices[0].finish_reason == "length"
    assert res.usage is not None and res.usage.completion_tokens == 2


def test_logprobs_null_when_engine_gives_none(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=2
    )
    assert res.choices[0].logprobs is None
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=2, stream=True)
    assert all(c.choices[0].logprobs is None for c in stream)


def test_json_object_refused_by_echo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, response_format={"type": "json_object"}
        )
    assert "json_object is not supported by this engine" in err.value.message
    assert err.value.body["param"] == "response_format"  # type: ignore[index]


def test_model_field_may_be_omitted(echo_server: Server) -> None:
    res = httpx.post(echo_server.url + "/completions", json={"prompt": "hi", "max_tokens": 1})
    assert res.status_code == 200
    assert res.json()["choices"][0]["text"] == "hi"


# --- models, embeddings -----------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL_NAME, "model", "dynamo-run")]
    model = client.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME
    # Extra field: the sampling defaults an unset field gets, and where each came from.
    defaults = model.model_extra["generation_defaults"]
    assert defaults["temperature"] == {"value": 0.2, "source": DEFAULT_MODEL_SOURCE}
    assert defaults["repetition_penalty"] == {"value": 1.1, "source": DEFAULT_MODEL_SOURCE}
    assert defaults["top_k"]["value"] == 40
    assert model.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_embeddings_unsupported_by_echo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL_NAME, input="hello")
    assert "model does not support embeddings" in err.value.message


# --- errors -----------------------------------------------------------------------------


def _error(res: httpx.Response, status: int) -> dict[str, object]:
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in res.text
    return body["error"]


def test_bad_parameter_is_400_naming_field(client: openai.OpenAI, echo_server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=5)
    assert "temperature" in err.value.message
    res = httpx.post(echo_server.url + "/chat/completions", json={"messages": []})
    error = _error(res, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    res = httpx.post(echo_server.url + "/completions", json={"max_tokens": 3})
    assert _error(res, 400)["param"] == "prompt"
    res = httpx.post(echo_server.url + "/completions", json={"prompt": "x", "n": "many"})
    assert "n:" in str(_error(res, 400)["message"])


def test_bad_json_is_400(echo_server: Server) -> None:
    res = httpx.post(echo_server.url + "/chat/completions", content=b"{not json")
    assert "not valid JSON" in str(_error(res, 400)["message"])
    res = httpx.post(echo_server.url + "/chat/completions", content=b"[1, 2]")
    assert "JSON object" in str(_error(res, 400)["message"])
    res = httpx.post(echo_server.url + "/chat/completions", content=b"\xff\xfe\xfa")
    _error(res, 400)


def test_over_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="hello " * 9000)
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 8192" in err.value.message


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    assert "gpt-17" in err.value.message


def test_unknown_route_and_method(echo_server: Server) -> None:
    _error(httpx.get(echo_server.url + "/nothing-here"), 404)
    _error(httpx.get(echo_server.url + "/chat/completions"), 405)


def test_health_and_live(echo_server: Server) -> None:
    for path in ("/health", "/live"):
        res = httpx.get(echo_server.root + path)
        assert res.status_code == 200
        assert res.json() == {"status": "healthy", "model": MODEL_NAME}


def test_openapi_document(echo_server: Server) -> None:
    doc = httpx.get(echo_server.root + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings"} <= set(
        doc["paths"]
    )
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "ErrorResponse" in doc["components"]["schemas"]


def test_access_log_one_line_per_request(echo_server: Server) -> None:
    httpx.get(echo_server.url + "/models?probe=accesslog")
    lines = [ln for ln in echo_server.log().splitlines() if '"GET /v1/models" 200' in ln]
    assert lines and lines[-1].rstrip().endswith("ms")


def test_metrics_change_after_requests(echo_server: Server, client: openai.OpenAI) -> None:
    before = echo_server.metrics()
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=False)
    list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=9)
    after = echo_server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    requests = "dynamo_frontend_requests_total"
    assert delta(requests, endpoint="completions", request_type="unary", status="200") == 1
    assert delta(requests, endpoint="completions", request_type="stream", status="200") == 1
    assert delta(requests, endpoint="completions", status="400") == 1
    assert delta("dynamo_frontend_time_to_first_token_seconds_count", model=MODEL_NAME) == 2
    assert delta("dynamo_frontend_inter_token_latency_seconds_count") == 16
    assert delta("dynamo_frontend_input_sequence_tokens_sum") == 18
    assert delta("dynamo_frontend_output_sequence_tokens_sum") == 18
    assert delta("dynamo_frontend_request_duration_seconds_count") == 2
    assert metric(after, "dynamo_frontend_inflight_requests") == 0
    assert metric(after, "dynamo_engine_inflight_requests") == 0


def test_metrics_exposition_names(echo_server: Server) -> None:
    text = httpx.get(echo_server.root + "/metrics").text
    for name in (
        "dynamo_frontend_requests_total",
        "dynamo_frontend_inflight_requests",
        "dynamo_frontend_time_to_first_token_seconds",
        "dynamo_frontend_inter_token_latency_seconds",
        "dynamo_frontend_input_sequence_tokens",
        "dynamo_frontend_output_sequence_tokens",
        "dynamo_frontend_request_duration_seconds",
    ):
        assert f"# TYPE {name} " in text, name


def test_empty_token_prompt_is_400(echo_server: Server) -> None:
    res = httpx.post(echo_server.url + "/completions", json={"prompt": [[]]})
    assert json.loads(res.text)["error"]["message"] == "the prompt is empty"
