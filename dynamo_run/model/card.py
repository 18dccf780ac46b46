"""The model card: everything the frontend needs to serve a model, whichever engine runs it.

A card holds the served name, context length, tokenizer, chat template and stop tokens. It
is built from a GGUF file's metadata or a Hugging Face folder, and can be serialised so that
a worker can hand it to a frontend on another host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from dynamo_run.model.default_model_template import with_tool_branch
from dynamo_run.model.generation_defaults import (
    DEFAULT_MODEL_RECOMMENDED,
    DEFAULT_MODEL_SOURCE,
    model_defaults_from_gguf,
    model_defaults_from_hf,
)
from dynamo_run.model.gguf_meta import GGUFError, read_gguf_metadata
from dynamo_run.model.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf
from dynamo_run.model.resolve import DEFAULT_MODEL_NAME, ResolvedModel, resolve_model
from dynamo_run.model.template import ChatTemplate

DEFAULT_CONTEXT_LENGTH = 4096


class ModelCardError(ValueError):
    """The model files are incomplete or damaged; the message names the path."""


@dataclass
class ModelCard:
    name: str
    path: Path
    kind: str  # "gguf" | "hf"
    context_length: int
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    bos_token_id: int | None = None
    add_bos_token: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = ""
    # The model's own sampling recommendations and the file they came from; the
    # frontend layers them under the request's fields (model/generation_defaults.py).
    generation_defaults: dict[str, float | int] = field(default_factory=dict)
    generation_defaults_source: str = ""
    # Output parsers (--tool-call-parser, --reasoning-parser); they travel with the card so
    # that a frontend parses a worker's answers the way the worker was configured.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.eos_token_ids)

    def describe(self) -> dict[str, Any]:
        """A summary for ``/show`` and logs."""
        return {
            "name": self.name,
            "path": str(self.path),
            "format": self.kind,
            "architecture": self.architecture,
            "context_length": self.context_length,
            "vocab_size": self.tokenizer.get_vocab_size(),
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": self.eos_token_ids,
            "tool_call_parser": self.tool_call_parser,
            "reasoning_parser": self.reasoning_parser,
        }


@dataclass(frozen=True)
class CardOverrides:
    """What the command line changes in a card: ``--chat-template`` (the file's text),
    ``--tool-call-parser`` and ``--reasoning-parser``. A frontend applies its own to the
    cards of remote workers too; what it leaves unset keeps the worker's setting."""

    chat_template: str | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def apply(self, card: ModelCard) -> ModelCard:
        if self.chat_template is not None:
            old = card.chat_template
            card.chat_template = ChatTemplate(self.chat_template, old.bos_token, old.eos_token)
        if self.tool_call_parser is not None:
            card.tool_call_parser = self.tool_call_parser
        if self.reasoning_parser is not None:
            card.reasoning_parser = self.reasoning_parser
        return card


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return ""
    return tokenizer.id_to_token(token_id) or ""


def _gguf_template(meta: dict[str, Any], is_default: bool) -> str | None:
    """The GGUF's chat template; the built-in default model's gains tool calling."""
    own = meta.get("tokenizer.chat_template")
    return with_tool_branch(own) if is_default and own else own


def _card_from_gguf(resolved: ResolvedModel, name: str | None, ctx: int | None) -> ModelCard:
    try:
        meta = read_gguf_metadata(resolved.path)
        tokenizer = tokenizer_from_gguf(meta)
    except (GGUFError, GGUFTokenizerError) as exc:
        raise ModelCardError(f"{resolved.path}: {exc}") from exc
    arch = str(meta.get("general.architecture", ""))
    trained_ctx = int(meta.get(f"{arch}.context_length", DEFAULT_CONTEXT_LENGTH))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos_ids = [
        int(meta[k])
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if k in meta
    ]
    default_name = DEFAULT_MODEL_NAME if resolved.is_default else resolved.path.stem
    gguf_defaults = model_defaults_from_gguf(meta)
    recommended = dict(DEFAULT_MODEL_RECOMMENDED) if resolved.is_default else {}
    return ModelCard(
        name=name or default_name,
        path=resolved.path,
        kind="gguf",
        context_length=min(ctx, trained_ctx) if ctx else trained_ctx,
        tokenizer=tokenizer,
        chat_template=ChatTemplate(
            _gguf_template(meta, resolved.is_default),
            _token_text(tokenizer, bos),
            _token_text(tokenizer, eos_ids[0] if eos_ids else None),
        ),
        bos_token_id=bos,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        eos_token_ids=sorted(set(eos_ids)),
        architecture=arch,
        generation_defaults=gguf_defaults or recommended,
        generation_defaults_source=(
            "GGUF general.sampling" if gguf_defaults or not recommended else DEFAULT_MODEL_SOURCE
        ),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: cannot read JSON: {exc}") from exc


def _special_text(value: Any) -> str:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _card_from_hf(resolved: ResolvedModel, name: str | None, ctx: int | None) -> ModelCard:
    folder = resolved.path
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelCardError(f"{folder}: no tokenizer.json (a fast tokenizer is required)")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise ModelCardError(f"{tokenizer_file}: not a valid tokenizer: {exc}") from exc
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    gen_config = _read_json(folder / "generation_config.json")

    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")

    bos_text = _special_text(tok_config.get("bos_token"))
    eos_text = _special_text(tok_config.get("eos_token"))
    bos_id = tokenizer.token_to_id(bos_text) if bos_text else config.get("bos_token_id")
    eos_ids: list[int] = []
    for source in (gen_config.get("eos_token_id"), config.get("eos_token_id")):
        if isinstance(source, int):
            eos_ids.append(source)
        elif isinstance(source, list):
            eos_ids.extend(int(x) for x in source)
    if eos_text and tokenizer.token_to_id(eos_text) is not None:
        eos_ids.append(tokenizer.token_to_id(eos_text))

    trained_ctx = int(
        config.get("max_position_embeddings")
        or tok_config.get("model_max_length", DEFAULT_CONTEXT_LENGTH)
    )
    trained_ctx = min(trained_ctx, 1 << 20)  # tokenizer_config uses 1e30 for "unbounded"
    return ModelCard(
        name=name or (resolved.source if not Path(resolved.source).exists() else folder.name),
        path=folder,
        kind="hf",
        context_length=min(ctx, trained_ctx) if ctx else trained_ctx,
        tokenizer=tokenizer,
        chat_template=ChatTemplate(template, bos_text, eos_text),
        bos_token_id=bos_id,
        add_bos_token=bool(tok_config.get("add_bos_token", False)),
        eos_token_ids=sorted(set(eos_ids)),
        architecture=",".join(config.get("architectures", [])),
        generation_defaults=model_defaults_from_hf(gen_config),
        generation_defaults_source="generation_config.json",
    )


def load_model_card(
    model: str | None, served_name: str | None = None, context_length: int | None = None
) -> ModelCard:
    """Resolve MODEL and build its card. Raises ModelNotFoundError / ModelCardError."""
    resolved = resolve_model(model)
    if resolved.kind == "gguf":
        return _card_from_gguf(resolved, served_name, context_length)
    return _card_from_hf(resolved, served_name, context_length)
