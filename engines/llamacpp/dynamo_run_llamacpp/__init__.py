"""llama.cpp engine for dynamo-run: GGUF models through llama-cpp-python's low-level API,
with continuous batching over ``n_parallel`` sequences and prefix reuse.

Importing this package is cheap; llama_cpp is loaded only when an engine is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard
    from dynamo_run_llamacpp.engine import LlamaCppEngine

__all__ = ["create_engine"]


def create_engine(card: ModelCard, config: EngineConfig) -> LlamaCppEngine:
    """Entry point for ``out=llamacpp``: check the engine arguments, then load the model.
    ``--kv-cache-block-size`` is the block size of its KV events."""
    from dynamo_run_llamacpp.config import parse_settings

    settings = parse_settings(card.context_length, config)
    from dynamo_run_llamacpp.engine import LlamaCppEngine

    block_size = config.kv_cache_block_size
    return LlamaCppEngine(
        card, settings, kv_block_size=DEFAULT_BLOCK_SIZE if block_size is None else block_size
    )
