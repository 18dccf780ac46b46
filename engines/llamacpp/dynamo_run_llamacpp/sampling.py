"""Per-request token selection with llama.cpp's sampler chains, plus log-probabilities.

Plain greedy requests get no chain at all: the scheduler takes the argmax of the logits
with numpy, which is much cheaper than building llama.cpp's candidate array.
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
    """False when plain argmax picks the same token the full chain would."""
    temperature = DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature
    guided = opts.json_object or opts.json_schema is not None
    return temperature > 0 or guided or _penalties(opts) != (1.0, 0.0, 0.0)


def greedy_under_grammar(opts: SamplingOptions) -> bool:
    """True when the chain is exactly [grammar, greedy]: then the unconstrained argmax can be
    tried first (see GrammarProbe), and the grammar runs over the vocabulary only when it
    rejects that token."""
    temperature = DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature
    guided = opts.json_object or opts.json_schema is not None
    return guided and temperature <= 0 and _penalties(opts) == (1.0, 0.0, 0.0)


class GrammarProbe:
    """Asks a grammar sampler whether it accepts one token, on a one-candidate array.

    Applying a grammar to the whole vocabulary costs a walk over every token's text; most
    steps of a constrained answer pick the token the model prefers anyway, so checking that
    one token first is much cheaper (llama.cpp's own common sampler does the same)."""

    def __init__(self) -> None:
        self._data = (L.llama_token_data * 1)()
        self._array = L.llama_token_data_array(
            data=ctypes.cast(self._data, ctypes.POINTER(L.llama_token_data)),
            size=1,
            selected=-1,
            sorted=False,
        )

    def allows(self, grammar: L.llama_sampler_p, token: int) -> bool:
        item = self._data[0]
        item.id, item.logit, item.p = token, 0.0, 0.0
        self._array.size, self._array.selected = 1, -1
        L.llama_sampler_apply(grammar, ctypes.byref(self._array))
        return item.logit != -math.inf


def build_chain(
    opts: SamplingOptions,
    vocab: L.llama_vocab_p,
    n_vocab: int,
    history: int,
    default_seed: int | None,
    grammar: str | None = None,
) -> L.llama_sampler_p:
    """A sampler chain for ``opts``; the caller frees it with ``llama_sampler_free``.
    ``history`` is how many past tokens the repetition penalties look at; ``grammar`` is
    the GBNF of ``opts.json_schema`` (grammar.schema_grammar), which wins over json_object."""
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
    if grammar is None and opts.json_object:
        grammar = JSON_OBJECT_GBNF
    if grammar is not None:
        add(L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root"), "grammar")
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
