"""TensorRT-LLM engine for dynamo-run: Hugging Face models through TensorRT-LLM's ``LLM``
API (its PyTorch backend), token ids in and out (``generate_async(ids, SamplingParams,
streaming=True)``), with its KV cache events forwarded to the router.

Importing this package is cheap (``--help`` and ``out=auto`` ask it whether it can run);
tensorrt_llm and torch are imported only when an engine is created.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard
    from dynamo_run_trtllm.engine import TrtLlmEngine

__all__ = ["create_engine", "unusable_reason"]

INSTALL_HINT = "pip install 'dynamo-run[trtllm]' (its wheels come from NVIDIA's package index)"


def unusable_reason() -> str | None:
    """None if TensorRT-LLM is installed and an NVIDIA GPU is present, else why not. Looks
    only at the installed packages and the driver's device files: no tensorrt_llm import
    (which loads CUDA libraries and takes seconds)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return f"tensorrt-llm is not installed: {INSTALL_HINT}"
    from dynamo_run.devices import has_nvidia_gpu

    if not has_nvidia_gpu():
        return "no NVIDIA GPU found (trtllm needs CUDA)"
    return None


def create_engine(card: ModelCard, config: EngineConfig) -> TrtLlmEngine:
    """Entry point for ``out=trtllm``: check the model, the arguments and the machine, then
    start TensorRT-LLM. Every failure is one EngineError line."""
    from dynamo_run_trtllm.engine import TrtLlmEngine

    return TrtLlmEngine.start(card, config)
