"""The built-in simulated engine, ``out=mocker`` (see :mod:`dynamo_run.mocker.engine`).

Modules: ``config`` (--extra-engine-args), ``block_pool`` (KV blocks, prefix reuse, LRU,
events), ``tokens`` (the deterministic next-token function), ``scheduler`` (batching and
timing), ``engine`` (the Engine interface).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig

if TYPE_CHECKING:
    from dynamo_run.mocker.engine import MockerEngine
    from dynamo_run.model.card import ModelCard


def create_engine(card: ModelCard, config: EngineConfig) -> MockerEngine:
    """Entry point for ``out=mocker``: check the settings, find the tokenizer's word tokens."""
    from dynamo_run.mocker.config import parse_settings
    from dynamo_run.mocker.engine import MockerEngine
    from dynamo_run.mocker.tokens import word_token_ids

    settings = parse_settings(config)
    words = word_token_ids(card.tokenizer, exclude=card.eos_token_ids)
    return MockerEngine(settings, words, config.context_length or card.context_length)


__all__ = ["create_engine"]
