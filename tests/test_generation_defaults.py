"""Generation defaults: the order they are layered in, where each comes from, and that every
input gets them (the preprocessor applies them once for all)."""

from __future__ import annotations

import json

import pytest
from test_model_card import make_hf_folder

from dynamo_run.model.card import load_model_card
from dynamo_run.model.generation_defaults import (
    DEFAULT_MODEL_SOURCE,
    LLAMA_CPP_DEFAULTS,
    SOURCE_LLAMA_CPP,
    SOURCE_REQUEST_TEMPLATE,
    model_defaults_from_gguf,
    model_defaults_from_hf,
    resolve_generation_defaults,
)
from dynamo_run.pipeline.preprocess import Preprocessor
from dynamo_run.protocol.openai import ChatCompletionRequest, CompletionRequest


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], **fields)


def test_without_model_defaults_llama_cpp_defaults_apply():
    resolved = resolve_generation_defaults({}, "GGUF general.sampling")
    assert resolved.values == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    assert set(resolved.sources.values()) == {SOURCE_LLAMA_CPP}


def test_order_template_then_model_then_llama_cpp():
    resolved = resolve_generation_defaults(
        {"temperature": 0.6, "top_p": 0.9, "max_tokens": 256},
        "generation_config.json",
        {"temperature": 0.2, "messages": [], "seed": 3},
    )
    described = resolved.describe()
    assert described["temperature"] == {"value": 0.2, "source": SOURCE_REQUEST_TEMPLATE}
    assert described["top_p"] == {"value": 0.9, "source": "generation_config.json"}
    assert described["max_tokens"] == {"value": 256, "source": "generation_config.json"}
    assert described["top_k"] == {"value": 40, "source": SOURCE_LLAMA_CPP}
    assert described["min_p"] == {"value": 0.05, "source": SOURCE_LLAMA_CPP}
    assert "seed" not in described  # only sampling defaults are layered here


def test_mode_none_is_plain_openai():
    resolved = resolve_generation_defaults(
        {"temperature": 0.6}, "generation_config.json", mode="none"
    )
    assert resolved.values == {}
    with_template = resolve_generation_defaults({}, "x", {"top_k": 5}, mode="none")
    assert with_template.values == {"top_k": 5}  # the user's own template still applies
    with pytest.raises(ValueError):
        resolve_generation_defaults({}, "x", mode="sometimes")


def test_hf_generation_config_fields():
    values = model_defaults_from_hf(
        {
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
            "max_new_tokens": 512,
            "do_sample": True,
            "eos_token_id": 2,
        }
    )
    assert values == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_tokens": 512,
    }
    # do_sample false means greedy in transformers: its temperature is not a recommendation.
    greedy = model_defaults_from_hf({"do_sample": False, "temperature": 0.9, "max_new_tokens": 9})
    assert greedy == {"temperature": 0.0, "max_tokens": 9}
    # Values that mean "off" or make no sense are not defaults.
    assert model_defaults_from_hf({"top_k": 0, "top_p": 0, "temperature": "hot"}) == {}


def test_gguf_sampling_keys():
    meta = {
        "general.sampling.temp": 0.6,
        "general.sampling.top_k": 20,
        "general.sampling.top_p": 0.95,
        "general.sampling.min_p": 0.0,
        "general.sampling.penalty_repeat": 1.1,
        "general.name": "x",
    }
    assert model_defaults_from_gguf(meta) == {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "min_p": 0.0,
        "repetition_penalty": 1.1,
    }


def test_default_model_gets_its_preset_then_llama_cpp(default_card):
    pre = Preprocessor(default_card)
    sampling = pre.chat(chat()).engine_request.sampling
    assert (sampling.temperature, sampling.top_p) == (0.2, 0.9)  # SmolLM2's model card
    assert (sampling.top_k, sampling.min_p) == (
        LLAMA_CPP_DEFAULTS["top_k"],
        LLAMA_CPP_DEFAULTS["min_p"],
    )
    # Against phrase loops at that low temperature (issue 18), as Ollama's default.
    assert sampling.repetition_penalty == 1.1
    sources = {name: item["source"] for name, item in pre.defaults.describe().items()}
    assert sources == {
        "temperature": DEFAULT_MODEL_SOURCE,
        "top_p": DEFAULT_MODEL_SOURCE,
        "top_k": SOURCE_LLAMA_CPP,
        "min_p": SOURCE_LLAMA_CPP,
        "repetition_penalty": DEFAULT_MODEL_SOURCE,
    }


def test_another_gguf_without_sampling_keys_gets_llama_cpp_defaults(tmp_path, default_gguf):
    copy = tmp_path / "other.gguf"
    copy.symlink_to(default_gguf)
    pre = Preprocessor(load_model_card(str(copy)))
    sampling = pre.chat(chat()).engine_request.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p) == (
        0.8,
        40,
        0.95,
        0.05,
    )


def test_explicit_values_win_and_zero_stays_greedy(default_card):
    pre = Preprocessor(default_card, {"top_p": 0.5})
    request = pre.chat(chat(temperature=0, top_k=3, seed=7)).engine_request
    assert request.sampling.temperature == 0
    assert request.sampling.top_k == 3
    assert request.sampling.top_p == 0.5  # from --request-template
    assert request.sampling.seed == 7
    completion = pre.completion(CompletionRequest(prompt="Hi", min_p=0.2))[0]
    assert completion.engine_request.sampling.min_p == 0.2
    assert completion.engine_request.sampling.temperature == 0.2


def test_generation_config_none_leaves_fields_unset(default_card):
    sampling = Preprocessor(default_card, None, "none").chat(chat()).engine_request.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p) == (
        None,
        None,
        None,
        None,
    )


def test_hf_folder_card_carries_its_generation_config(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 40})
    )
    card = load_model_card(str(folder))
    assert card.generation_defaults == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 40}
    pre = Preprocessor(card)
    request = pre.chat(chat()).engine_request
    assert request.sampling.temperature == 0.3
    assert request.sampling.top_k == 40
    assert request.stop.max_tokens == 40
    assert pre.chat(chat(max_tokens=5)).engine_request.stop.max_tokens == 5
    assert pre.defaults.describe()["temperature"]["source"] == "generation_config.json"


def test_greedy_with_defaults_needs_no_sampler_chain():
    """temperature 0 stays the cheap argmax path even though top_k/top_p/min_p are set."""
    sampling_mod = pytest.importorskip("dynamo_run_llamacpp.sampling")
    from dynamo_run.protocol.internal import SamplingOptions

    opts = SamplingOptions(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05)
    assert not sampling_mod.needs_chain(opts)
