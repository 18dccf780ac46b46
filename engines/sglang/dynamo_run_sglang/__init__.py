"""SGLang engine for dynamo-run: Hugging Face models through SGLang's offline ``Engine``,
token ids in and out (``async_generate(input_ids=..., stream=True)``), with SGLang's own KV
events forwarded to the router.

Importing this package is cheap (``--help`` and ``out=auto`` ask it whether it can run);
sglang and torch are imported only when an engine is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_run.engine import EngineConfig
from dynamo_run_sglang.install import INSTALL_HINT, unusable_reason

if TYPE_CHECKING:
    from dynamo_run.model.card import ModelCard
    from dynamo_run_sglang.engine import SGLangEngine

__all__ = ["INSTALL_HINT", "create_engine", "unusable_reason"]


def create_engine(card: ModelCard, config: EngineConfig) -> SGLangEngine:
    """Entry point for ``out=sglang``: check the model, the arguments and the machine, then
    start SGLang. Every failure is one EngineError line."""
    from dynamo_run_sglang.engine import SGLangEngine

    return SGLangEngine.start(card, config)
