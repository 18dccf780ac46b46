"""A host-memory cache of sequences' KV state, so that a prompt seen before is restored
with a memory copy instead of being decoded again after its slot was given to another
request (llama-server keeps such a cache too, ``--cache-ram``).

The scheduler saves a slot's state just before a new request overwrites it, and restores
an entry into the slot chosen for a request when the entry shares a clearly longer prefix
with the prompt than anything still in a slot. Everything runs on the scheduler thread.

While the engine reports KV events (kv_events.py), each entry holds the block hashes of its
tokens in the scheduler's :class:`KvTracker` from its save until it is dropped.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp.llama_cpp as L
import numpy as np

if TYPE_CHECKING:
    from dynamo_run_llamacpp.kv_events import KvTracker

# Worth saving: a slot holding fewer tokens is cheap to decode again.
MIN_SAVE_TOKENS = 16
# Worth restoring: the entry must cover this many more prompt tokens than the slot does.
MIN_GAIN_TOKENS = 4
# ... and at least 1/RESTORE_RATIO of its own length, since copying a long entry back
# (about 23 KB per token for SmolLM2, 128 KB for an 8B model) is not free either.
RESTORE_RATIO = 64


@dataclass
class Entry:
    tokens: np.ndarray  # int32, the positions 0..n-1 the state holds
    state: np.ndarray  # uint8, llama_state_seq_get_data's bytes
    hashes: list[int] = field(default_factory=list)  # its full blocks' chain, while tracked


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    same = a[:m] == b[:m]
    return m if same.all() else int(same.argmin())


class PromptCache:
    """LRU entries within ``capacity`` bytes; ``capacity`` 0 disables the cache."""

    def __init__(self, ctx: L.llama_context_p, capacity: int) -> None:
        self.ctx = ctx
        self.capacity = capacity
        self.size = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_key = 0
        self.saved = 0
        self.restored = 0
        self.restored_tokens = 0
        self.kv: KvTracker | None = None  # set by the scheduler while it reports KV events

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def save(self, seq_id: int, tokens: np.ndarray, hashes: list[int] | None = None) -> bool:
        """Keep the KV of ``seq_id``, which holds ``tokens`` (``hashes``: the chain of their
        full blocks, when KV events are reported); False if not worth it."""
        n = len(tokens)
        if not self.capacity or n < MIN_SAVE_TOKENS:
            return False
        for key, entry in list(self._entries.items()):
            shared = common_prefix(entry.tokens, tokens)
            if shared == n:  # already covered by an entry at least as long
                self._entries.move_to_end(key)
                return False
            if shared == len(entry.tokens):  # the new state extends this entry
                self._drop(key)
        size = L.llama_state_seq_get_size(self.ctx, seq_id)
        if size <= 0 or size > self.capacity:
            return False
        state = np.empty(size, dtype=np.uint8)
        ptr = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if L.llama_state_seq_get_data(self.ctx, ptr, size, seq_id) != size:
            return False
        while self._entries and self.size + size > self.capacity:
            self._drop(next(iter(self._entries)))
        entry = self._entries[self._next_key] = Entry(tokens.copy(), state)
        if self.kv is not None:
            entry.hashes = list(hashes) if hashes is not None else self.kv.chain(entry.tokens)
            self.kv.hold(entry.hashes, None)
        self._next_key += 1
        self.size += size
        self.saved += 1
        return True

    def best(self, prompt: np.ndarray, have: int) -> tuple[int, int] | None:
        """The entry worth restoring for ``prompt`` when a slot already covers ``have``
        tokens of it: (key, shared prefix length), or None."""
        best_key, best_shared = None, have
        for key, entry in self._entries.items():
            shared = common_prefix(entry.tokens, prompt)
            gain = shared - have
            worth = gain >= MIN_GAIN_TOKENS and gain * RESTORE_RATIO >= len(entry.tokens)
            if worth and shared > best_shared:
                best_key, best_shared = key, shared
        return None if best_key is None else (best_key, best_shared)

    def restore(self, key: int, seq_id: int) -> Entry | None:
        """Load the entry into the (emptied) ``seq_id``; the entry (the tokens it now holds),
        or None if llama.cpp refused the state."""
        entry = self._entries[key]
        self._entries.move_to_end(key)
        ptr = entry.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if L.llama_state_seq_set_data(self.ctx, ptr, len(entry.state), seq_id) == 0:
            self._drop(key)
            return None
        self.restored += 1
        return entry

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.size -= len(entry.state)
        if self.kv is not None:
            self.kv.release(entry.hashes)
