"""SGLang engine for dynamo-run: Hugging Face models through SGLang's offline ``Engine``,
token ids in and out (``async_generate(input_ids=..., stream=True)``), with SGLang's own KV
events forwarded to the router.

Importing this package is cheap (``--help`` and ``out=auto`` ask it whether it can run);
sglang and torch are imported only when an engine is created.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard
    from dynamo_run_sglang.engine import SGLangEngine

__all__ = ["create_engine", "unusable_reason"]

INSTALL_HINT = "pip install 'dynamo-run[sglang]'"


def unusable_reason() -> str | None:
    """None if SGLang is installed and an NVIDIA GPU is present, else why not. Looks only
    at the installed packages and the driver's device files: no sglang or torch import."""
    if importlib.util.find_spec("sglang") is None:
        return f"sglang is not installed: {INSTALL_HINT}"
    from dynamo_run.devices import has_nvidia_gpu

    if not has_nvidia_gpu():
        return "no NVIDIA GPU found (sglang needs CUDA)"
    return None


def create_engine(card: ModelCard, config: EngineConfig) -> SGLangEngine:
    """Entry point for ``out=sglang``: check the model, the arguments and the machine, then
    start SGLang. Every failure is one EngineError line."""
    from dynamo_run_sglang.engine import SGLangEngine

    return SGLangEngine.start(card, config)
