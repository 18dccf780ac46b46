"""TensorRT-LLM's KV cache events, re-hashed into our chained block hashes.

With ``kv_cache_config.event_buffer_max_size`` > 0 and block reuse on, the LLM keeps
events that ``get_kv_cache_events_async`` hands out as dicts:
``{"event_id", "data": {"type": "stored", "parent_hash", "blocks": [{"block_hash",
"tokens": [{"token_id", ...}]}]}}``, ``{"type": "removed", "block_hashes"}``, and
``created`` / ``updated`` (capacity and priority changes, which routing ignores). Their
hashes are not ours, so each stored block is hashed again from its token ids, chained from
our hash of its parent; their hash is kept only to translate later removals.
"""

from __future__ import annotations

from typing import Any

from dynamo_run.engine_support.kv_rehash import KvRehasher


def _token_id(token: Any) -> int:
    if isinstance(token, dict):
        return int(token["token_id"])
    return int(getattr(token, "token_id", token))


class KvEventTranslator(KvRehasher):
    """TensorRT-LLM's event dicts in, ours out to the sink."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size, engine="trtllm")

    def handle(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            blocks = [
                (block.get("block_hash"), [_token_id(t) for t in block.get("tokens") or []])
                for block in data.get("blocks") or []
            ]
            self.stored(data.get("parent_hash"), blocks)
        elif kind == "removed":
            self.removed(data.get("block_hashes") or [])
