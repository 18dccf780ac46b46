"""Generation defaults: what a request that names no sampling parameter gets.

One place decides them so that every input (shell, single shot, HTTP, batch) and every
engine, local or remote, samples the same way. The order, first match wins per field:

1. the request's own fields (applied by the caller: a field it set is never replaced);
2. ``--request-template``;
3. the model's own defaults: an HF folder's ``generation_config.json`` (temperature, top_p,
   top_k, min_p, repetition_penalty, max_new_tokens), a GGUF's ``general.sampling.*`` keys;
4. llama.cpp's defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), so that a
   model without recommendations still answers sensibly rather than sampling the whole
   vocabulary at temperature 1.0.

``--generation-config none`` skips 3 and 4: plain OpenAI semantics (temperature 1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dynamo_run.settings import GenerationConfig

GENERATION_CONFIG_MODES = tuple(mode.value for mode in GenerationConfig)  # --generation-config

# Request field -> the value type it takes.
SAMPLING_DEFAULT_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_tokens": int,
}

LLAMA_CPP_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
}

# The built-in default model ships without sampling keys in its GGUF, so it gets a preset,
# as Ollama's library gives each model its own parameters: its publisher's model card's
# temperature 0.2 and top_p 0.9 (simple questions answered right more often than with
# llama.cpp's generic defaults), and Ollama's default repeat penalty 1.1, without which that
# low temperature lets a 135M model fall into phrase loops (``la Femme, la Femme, ...``) in
# about one answer in six. Measured in scripts/bench_quality.py (docs/benchmarks.md).
DEFAULT_MODEL_RECOMMENDED: dict[str, float | int] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "repetition_penalty": 1.1,
}
DEFAULT_MODEL_SOURCE = "SmolLM2-135M-Instruct preset (model card + repeat penalty)"

SOURCE_REQUEST_TEMPLATE = "--request-template"
SOURCE_LLAMA_CPP = "llama.cpp default"

# generation_config.json key -> request field (vLLM reads the same set).
_HF_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}

# GGUF metadata key -> request field (llama.cpp's general.sampling.* names).
_GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _coerce(name: str, value: Any) -> float | int | None:
    """The value as the field's type, or None when it is missing or nonsensical."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    kind = SAMPLING_DEFAULT_FIELDS[name]
    number = kind(value)
    if isinstance(number, float) and not math.isfinite(number):
        return None
    if name == "top_k" and number <= 0:
        return None  # 0 / -1 mean "no top-k": same as not setting it
    if name in ("top_p", "repetition_penalty", "max_tokens") and number <= 0:
        return None
    if name in ("temperature", "min_p") and number < 0:
        return None
    return number


def _read(mapping: dict[str, Any], keys: dict[str, str]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, name in keys.items():
        value = _coerce(name, mapping.get(key))
        if value is not None:
            out[name] = value
    return out


def model_defaults_from_hf(generation_config: dict[str, Any]) -> dict[str, float | int]:
    """The sampling defaults an HF ``generation_config.json`` recommends.

    A config with ``do_sample: false`` asks for greedy decoding (transformers ignores its
    temperature then), so it becomes temperature 0."""
    values = _read(generation_config, _HF_KEYS)
    if generation_config.get("do_sample") is False:
        values = {k: v for k, v in values.items() if k in ("max_tokens", "repetition_penalty")}
        values["temperature"] = 0.0
    return values


def model_defaults_from_gguf(metadata: dict[str, Any]) -> dict[str, float | int]:
    """The sampling defaults a GGUF's ``general.sampling.*`` keys recommend."""
    return _read(metadata, _GGUF_KEYS)


@dataclass
class GenerationDefaults:
    """Resolved defaults for one model: a value and where it came from, per field."""

    values: dict[str, float | int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, dict[str, Any]]:
        """For ``/show`` and ``GET /v1/models/{id}``: ``{field: {value, source}}``."""
        return {
            name: {"value": self.values[name], "source": self.sources[name]}
            for name in SAMPLING_DEFAULT_FIELDS
            if name in self.values
        }

    def fill(self, request_values: dict[str, Any]) -> dict[str, Any]:
        """``request_values`` with every field the request left unset (None) defaulted."""
        filled = dict(request_values)
        for name, value in self.values.items():
            if filled.get(name) is None:
                filled[name] = value
        return filled


def resolve_generation_defaults(
    model_defaults: dict[str, float | int],
    model_source: str,
    request_template: dict[str, Any] | None = None,
    mode: str = "auto",
) -> GenerationDefaults:
    """Layer the request template, the model's defaults and llama.cpp's (see module doc)."""
    if mode not in GENERATION_CONFIG_MODES:
        raise ValueError(f"generation config mode {mode!r}: choose auto or none")
    layers: list[tuple[dict[str, Any], str]] = []
    if request_template:
        template = {
            name: value
            for name in SAMPLING_DEFAULT_FIELDS
            if (value := _coerce(name, request_template.get(name))) is not None
        }
        layers.append((template, SOURCE_REQUEST_TEMPLATE))
    if mode == "auto":
        layers.append((model_defaults, model_source))
        layers.append((LLAMA_CPP_DEFAULTS, SOURCE_LLAMA_CPP))
    resolved = GenerationDefaults()
    for values, source in layers:
        for name, value in values.items():
            if name not in resolved.values:
                resolved.values[name] = value
                resolved.sources[name] = source
    return resolved
