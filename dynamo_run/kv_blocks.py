"""Chained hashes of token blocks: the identity of a cached prefix.

Block ``i`` of a sequence is hashed together with the hash of block ``i - 1``, so a block's
hash names the whole prefix up to its end. Equal prefixes give equal chains on every worker
and every host (the hash is a fixed function of the token ids, not Python's salted ``hash``),
which is what lets a router compare what different workers hold. Only full blocks count: a
partial last block is never shared.
"""

from __future__ import annotations

import hashlib
from array import array

DEFAULT_BLOCK_SIZE = 16
_ROOT = b"dynamo-run/kv/v1"


def block_hash(parent: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    """The 64-bit hash of one block of token ids following the block hashed ``parent``."""
    digest = hashlib.blake2b(digest_size=8, key=_ROOT)
    digest.update(b"\x00" * 8 if parent is None else parent.to_bytes(8, "little"))
    digest.update(array("Q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


def block_hashes(
    token_ids: list[int], block_size: int = DEFAULT_BLOCK_SIZE, parent: int | None = None
) -> list[int]:
    """Hashes of every full block of ``token_ids``, chained from ``parent``."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
