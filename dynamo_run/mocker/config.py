"""Mocker settings: ``--extra-engine-args`` JSON checked key by key.

Names follow Dynamo's mocker (``MockEngineArgs``) where it has one: ``num_gpu_blocks``,
``block_size``, ``max_num_seqs``, ``max_num_batched_tokens``, ``watermark``,
``speedup_ratio``. The timing model is our own: a fixed per-token prefill cost and a decode
step whose cost grows with the batch.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any

from dynamo_run.engine import EngineConfig, EngineError
from dynamo_run.kv_blocks import DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class MockerSettings:
    num_gpu_blocks: int = 16384  # KV blocks in the simulated pool
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block (also --kv-cache-block-size)
    max_num_seqs: int = 256  # sequences decoded together; more requests wait in a queue
    # Tokens one step may take in (one per decoding sequence plus the new prompts' uncached
    # tokens); the first prompt admitted in a step always fits, whatever its length.
    max_num_batched_tokens: int = 8192
    watermark: float = 0.01  # fraction of the pool kept free when admitting a request
    speedup_ratio: float = 1.0  # divides every simulated time
    prefill_ms_per_token: float = 0.1  # per uncached prompt token
    decode_ms_base: float = 10.0  # per step, whatever the batch
    decode_ms_per_seq: float = 0.5  # per step, for each sequence in the batch

    def step_seconds(self, batch: int, prefill_tokens: int) -> float:
        """Simulated wall time of one scheduler step: the decode of ``batch`` sequences
        plus the prefill of ``prefill_tokens`` uncached prompt tokens, sped up."""
        ms = (
            self.decode_ms_base
            + self.decode_ms_per_seq * batch
            + self.prefill_ms_per_token * prefill_tokens
        )
        return ms / 1000.0 / self.speedup_ratio


_INT_MINIMUMS = {
    "num_gpu_blocks": 1,
    "block_size": 1,
    "max_num_seqs": 1,
    "max_num_batched_tokens": 1,
}
_FLOAT_KEYS = ("prefill_ms_per_token", "decode_ms_base", "decode_ms_per_seq")


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"mocker: '{key}' must be an integer, got {value!r}")
    if value < minimum:
        raise EngineError(f"mocker: '{key}' must be >= {minimum}, got {value}")
    return value


def _as_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineError(f"mocker: '{key}' must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise EngineError(f"mocker: '{key}' must be finite, got {value!r}")
    return number


def _reject_unknown(extra: dict[str, Any], known: list[str]) -> None:
    unknown = [key for key in extra if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise EngineError(
        f"mocker: unknown engine argument(s) {', '.join(hints)}; known: {', '.join(sorted(known))}"
    )


def parse_settings(config: EngineConfig) -> MockerSettings:
    """Validate ``config.extra`` and fill in defaults. Raises EngineError naming bad keys."""
    extra = dict(config.extra or {})
    _reject_unknown(extra, [f.name for f in fields(MockerSettings)])
    values: dict[str, Any] = {}
    for key, minimum in _INT_MINIMUMS.items():
        if key in extra:
            values[key] = _as_int(key, extra[key], minimum)
    for key in _FLOAT_KEYS:
        if key in extra:
            values[key] = _as_number(key, extra[key])
            if values[key] < 0:
                raise EngineError(f"mocker: '{key}' must be >= 0, got {extra[key]!r}")
    if "speedup_ratio" in extra:
        values["speedup_ratio"] = _as_number("speedup_ratio", extra["speedup_ratio"])
        if values["speedup_ratio"] <= 0:
            raise EngineError(f"mocker: 'speedup_ratio' must be > 0, got {extra['speedup_ratio']}")
    if "watermark" in extra:
        values["watermark"] = _as_number("watermark", extra["watermark"])
        if not 0 <= values["watermark"] < 1:
            raise EngineError(f"mocker: 'watermark' must be in [0, 1), got {extra['watermark']}")

    flag = config.kv_cache_block_size
    if flag is not None:
        flag = _as_int("--kv-cache-block-size", flag, 1)
        if "block_size" in values and values["block_size"] != flag:
            raise EngineError(
                f"mocker: 'block_size' {values['block_size']} disagrees with "
                f"--kv-cache-block-size {flag}; give one of them"
            )
        values["block_size"] = flag
    return MockerSettings(**values)
