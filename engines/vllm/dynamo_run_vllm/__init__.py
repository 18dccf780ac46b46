"""vLLM engine for dynamo-run: Hugging Face models through vLLM's AsyncLLM, token ids in
and out, with vLLM's own KV events forwarded to the router.

Importing this package is cheap (``--help`` and ``out=auto`` ask it whether it can run);
vllm and torch are imported only when an engine is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard
    from dynamo_run_vllm.engine import VllmEngine

__all__ = ["create_engine", "unusable_reason"]


def unusable_reason() -> str | None:
    """None if vLLM is installed in a build that can run here, else why not (no imports:
    the installed distribution says which build it is)."""
    from dynamo_run_vllm.install import unusable_reason as reason

    return reason()


def create_engine(card: ModelCard, config: EngineConfig) -> VllmEngine:
    """Entry point for ``out=vllm``: check the model and arguments, then start vLLM."""
    from dynamo_run_vllm.engine import VllmEngine

    return VllmEngine.start(card, config)
