"""A model card as bytes, so a frontend on another host can serve a worker's model.

The card carries everything the frontend needs to template and tokenise (the tokenizer's
JSON, the chat template, special tokens, context length, generation defaults): the frontend
needs no copy of the model files. Compressed, because a tokenizer is megabytes of JSON.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import msgspec
from tokenizers import Tokenizer

from dynamo_run.model.card import ModelCard
from dynamo_run.model.template import ChatTemplate


class CardWire(msgspec.Struct):
    name: str
    kind: str
    path: str
    context_length: int
    tokenizer_json: str
    chat_template: str
    bos_text: str
    eos_text: str
    bos_token_id: int | None
    add_bos_token: bool
    eos_token_ids: list[int]
    architecture: str
    generation_defaults: dict[str, float | int]
    generation_defaults_source: str
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


def card_to_bytes(card: ModelCard) -> bytes:
    wire = CardWire(
        name=card.name,
        kind=card.kind,
        path=str(card.path),
        context_length=card.context_length,
        tokenizer_json=card.tokenizer.to_str(),
        chat_template=card.chat_template.source,
        bos_text=card.chat_template.bos_token,
        eos_text=card.chat_template.eos_token,
        bos_token_id=card.bos_token_id,
        add_bos_token=card.add_bos_token,
        eos_token_ids=list(card.eos_token_ids),
        architecture=card.architecture,
        generation_defaults=dict(card.generation_defaults),
        generation_defaults_source=card.generation_defaults_source,
        tool_call_parser=card.tool_call_parser,
        reasoning_parser=card.reasoning_parser,
    )
    return zlib.compress(msgspec.msgpack.encode(wire), 6)


def card_from_bytes(data: bytes) -> ModelCard:
    wire = msgspec.msgpack.decode(zlib.decompress(data), type=CardWire)
    return ModelCard(
        name=wire.name,
        path=Path(wire.path),
        kind=wire.kind,
        context_length=wire.context_length,
        tokenizer=Tokenizer.from_str(wire.tokenizer_json),
        chat_template=ChatTemplate(wire.chat_template, wire.bos_text, wire.eos_text),
        bos_token_id=wire.bos_token_id,
        add_bos_token=wire.add_bos_token,
        eos_token_ids=list(wire.eos_token_ids),
        architecture=wire.architecture,
        generation_defaults=dict(wire.generation_defaults),
        generation_defaults_source=wire.generation_defaults_source,
        tool_call_parser=wire.tool_call_parser,
        reasoning_parser=wire.reasoning_parser,
    )


def card_digest(data: bytes) -> str:
    """A name for the card's bytes in the card store: equal cards share one object."""
    return hashlib.sha256(data).hexdigest()[:32]
