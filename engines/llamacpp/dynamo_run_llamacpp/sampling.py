"""Per-request token selection with llama.cpp's sampler chains, plus log-probabilities.

Plain greedy requests get no chain at all: the scheduler takes the argmax of the logits
with numpy, which is much cheaper than building llama.cpp's candidate array. Requests
constrained by a grammar (JSON object / schema) go through GuidedPicker.
"""

from __future__ import annotations

import ctypes
import math

import llama_cpp.llama_cpp as L
import numpy as np

from dynamo_run.engine import EngineError
from dynamo_run.protocol.internal import SamplingOptions, TokenLogprob
from dynamo_run_llamacpp.grammar import JSON_OBJECT_GBNF

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request gives none


def _penalties(opts: SamplingOptions) -> tuple[float, float, float]:
    repeat = opts.repetition_penalty if opts.repetition_penalty is not None else 1.0
    freq = opts.frequency_penalty or 0.0
    present = opts.presence_penalty or 0.0
    return repeat, freq, present


def needs_chain(opts: SamplingOptions) -> bool:
    """False when plain argmax picks the same token the full chain would (a grammar, if
    any, is applied apart from the chain: see GuidedPicker)."""
    temperature = DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature
    return temperature > 0 or _penalties(opts) != (1.0, 0.0, 0.0)


def grammar_for(opts: SamplingOptions, schema_gbnf: str | None) -> str | None:
    """The GBNF constraining a request: its schema's (converted by the engine), else the
    JSON-object grammar for ``json_object``, else None."""
    if schema_gbnf is not None:
        return schema_gbnf
    return JSON_OBJECT_GBNF if opts.json_object else None


def new_grammar(vocab: L.llama_vocab_p, gbnf: str) -> L.llama_sampler_p:
    """A grammar sampler; the caller frees it with ``llama_sampler_free``."""
    sampler = L.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        raise EngineError("llamacpp: cannot create the grammar sampler")
    return sampler


class GuidedPicker:
    """Picks tokens under a grammar the way llama.cpp's common sampler does: choose as if
    unconstrained, ask the grammar about that one token, and only when it refuses run the
    grammar over the whole vocabulary and choose again.

    A grammar pass over the vocabulary walks every token's text (tens of ms per token for a
    49k vocabulary); most steps of a constrained answer pick a token the grammar allows
    anyway. The result has the same distribution as filtering first: a token the grammar
    allows is drawn with probability p + P(refused) * p / (1 - P(refused)) = p / (1 -
    P(refused)). Candidates live in a numpy buffer laid out as ``llama_token_data``, so
    filling them is one vectorised copy. One picker per scheduler thread.
    """

    _DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

    def __init__(self, n_vocab: int) -> None:
        assert self._DTYPE.itemsize == ctypes.sizeof(L.llama_token_data)
        self.n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._buf = np.zeros(n_vocab, dtype=self._DTYPE)
        self._array = L.llama_token_data_array(
            data=self._buf.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        self._one = (L.llama_token_data * 1)()
        self._one_array = L.llama_token_data_array(
            data=ctypes.cast(self._one, ctypes.POINTER(L.llama_token_data)),
            size=1,
            selected=-1,
            sorted=False,
        )
        self.argmax_ok = 0  # steps whose first choice the grammar allowed
        self.full_pass = 0  # steps that ran the grammar over the vocabulary

    def allows(self, grammar: L.llama_sampler_p, token: int) -> bool:
        item = self._one[0]
        item.id, item.logit, item.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        L.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        return item.logit != -math.inf

    def _choose(
        self, row: np.ndarray, chain: L.llama_sampler_p | None, grammar: L.llama_sampler_p | None
    ) -> int:
        buf = self._buf
        buf["id"] = self._ids
        buf["logit"] = row
        buf["p"] = 0.0
        array = self._array
        array.data = buf.ctypes.data_as(ctypes.POINTER(L.llama_token_data))
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        if grammar is not None:
            L.llama_sampler_apply(grammar, ctypes.byref(array))
        if chain is None:  # greedy: the best logit left
            return int(buf["id"][int(buf["logit"].argmax())])
        L.llama_sampler_apply(chain, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def pick(
        self, row: np.ndarray, chain: L.llama_sampler_p | None, grammar: L.llama_sampler_p
    ) -> int:
        """The next token under ``grammar``, chosen by ``chain`` (None: greedy); both
        samplers are advanced with it."""
        token = int(row.argmax()) if chain is None else self._choose(row, chain, None)
        if self.allows(grammar, token):
            self.argmax_ok += 1
        else:
            self.full_pass += 1
            token = self._choose(row, chain, grammar)
        if chain is not None:
            L.llama_sampler_accept(chain, token)
        L.llama_sampler_accept(grammar, token)
        return token


def build_chain(
    opts: SamplingOptions,
    vocab: L.llama_vocab_p,
    n_vocab: int,
    history: int,
    default_seed: int | None,
) -> L.llama_sampler_p:
    """A sampler chain for ``opts`` (penalties, truncation, temperature, a final pick); the
    caller frees it with ``llama_sampler_free``. ``history`` is how many past tokens the
    repetition penalties look at. Grammars are not part of it (GuidedPicker)."""
    params = L.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = L.llama_sampler_chain_init(params)

    def add(sampler: L.llama_sampler_p | None, what: str) -> None:
        if not sampler:
            L.llama_sampler_free(chain)
            raise EngineError(f"llamacpp: cannot create the {what} sampler")
        L.llama_sampler_chain_add(chain, sampler)

    repeat, freq, present = _penalties(opts)
    if (repeat, freq, present) != (1.0, 0.0, 0.0):
        add(L.llama_sampler_init_penalties(n_vocab, history, repeat, freq, present), "penalty")
    temperature = DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature
    if temperature <= 0:
        add(L.llama_sampler_init_greedy(), "greedy")
        return chain
    if opts.top_k is not None and opts.top_k > 0:
        add(L.llama_sampler_init_top_k(opts.top_k), "top_k")
    if opts.top_p is not None and opts.top_p < 1.0:
        add(L.llama_sampler_init_top_p(opts.top_p, 1), "top_p")
    if opts.min_p is not None and opts.min_p > 0.0:
        add(L.llama_sampler_init_min_p(opts.min_p, 1), "min_p")
    add(L.llama_sampler_init_temp(temperature), "temperature")
    seed = opts.seed if opts.seed is not None else default_seed
    seed = L.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
    add(L.llama_sampler_init_dist(seed), "dist")
    return chain


def token_logprob(row: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """Log-softmax of one logits row: the chosen token's logprob and the ``n_top`` best."""
    peak = float(row.max())
    log_z = peak + math.log(float(np.exp(row - peak).sum()))
    top: list[tuple[int, float]] = []
    if n_top > 0:
        n_top = min(n_top, row.shape[0])
        best = np.argpartition(row, -n_top)[-n_top:]
        best = best[np.argsort(-row[best], kind="stable")]
        top = [(int(t), float(row[t]) - log_z) for t in best]
    return TokenLogprob(token_id=int(token), logprob=float(row[token]) - log_z, top=top)
