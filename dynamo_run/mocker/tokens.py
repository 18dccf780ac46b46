"""The mocker's deterministic "model": the next token is a pure function of the whole token
sequence so far.

A rolling 64-bit hash runs over the sequence (over the prompt once when a request is
admitted, then one update per generated token) and picks the next token from the model's
"word-like" tokens: those whose text is a space followed by ASCII letters, so that answers
detokenize to readable pseudo-words. Equal sequences give equal continuations on every
mocker instance, which makes a continuation of (prompt + k generated tokens) reproduce the
original answer from token k + 1 on. Sampling settings are ignored.
"""

from __future__ import annotations

import re
import threading

from tokenizers import Tokenizer

from dynamo_run.engine import EngineError

_MASK = (1 << 64) - 1
_SEED = 0x6A09E667F3BCC908
_MULT = 0x100000001B3  # FNV-1a 64-bit prime
_WORD = re.compile(r" [A-Za-z]+")

_cache_lock = threading.Lock()
_cache: dict[int, tuple[Tokenizer, list[int]]] = {}


def _mix(state: int, token: int) -> int:
    """One step of the rolling hash: absorb ``token``, then scramble (splitmix64 finish)."""
    x = ((state ^ (token + 1)) * _MULT) & _MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sequence_hash(token_ids: list[int], state: int = _SEED) -> int:
    """The rolling hash of a token sequence (continuing from ``state``)."""
    for token in token_ids:
        state = _mix(state, token)
    return state


def word_token_ids(tokenizer: Tokenizer, exclude: list[int] | tuple[int, ...] = ()) -> list[int]:
    """Ids whose decoded text is one space and ASCII letters, ascending; computed once per
    tokenizer. Raises EngineError for a vocabulary without any."""
    with _cache_lock:
        hit = _cache.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            words = hit[1]
        else:
            size = tokenizer.get_vocab_size()
            texts = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
            words = [i for i, text in enumerate(texts) if _WORD.fullmatch(text)]
            _cache[id(tokenizer)] = (tokenizer, words)
    banned = set(exclude)
    chosen = [i for i in words if i not in banned]
    if not chosen:
        raise EngineError("mocker: the tokenizer has no word-like tokens (' ' + letters)")
    return chosen


class TokenSource:
    """Next tokens for one sequence. ``state`` is the rolling hash of everything so far."""

    __slots__ = ("state", "words")

    def __init__(self, words: list[int], prompt: list[int]) -> None:
        self.words = words
        self.state = sequence_hash(prompt)

    def next_token(self) -> int:
        """The token that follows the sequence so far; it is appended to the sequence."""
        token = self.words[self.state % len(self.words)]
        self.state = _mix(self.state, token)
        return token
