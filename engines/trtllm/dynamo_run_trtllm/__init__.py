"""TensorRT-LLM engine for dynamo-run: Hugging Face models through TensorRT-LLM's ``LLM``
API (its PyTorch backend), token ids in and out (``generate_async(ids, SamplingParams,
streaming=True)``), with its KV cache events forwarded to the router.

Importing this package is cheap (``--help`` and ``out=auto`` ask it whether it can run);
tensorrt_llm and torch are imported only when an engine is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig
from dynamo_run_trtllm.install import INSTALL_HINT, unusable_reason

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard
    from dynamo_run_trtllm.engine import TrtLlmEngine

__all__ = ["INSTALL_HINT", "create_engine", "unusable_reason"]


def create_engine(card: ModelCard, config: EngineConfig) -> TrtLlmEngine:
    """Entry point for ``out=trtllm``: check the model, the arguments and the machine, then
    start TensorRT-LLM. Every failure is one EngineError line."""
    from dynamo_run_trtllm.engine import TrtLlmEngine

    return TrtLlmEngine.start(card, config)
