"""Sentence embeddings from the same model: a second, small llama.cpp context with mean
pooling, created on first use and driven from the scheduler thread."""

from __future__ import annotations

import llama_cpp.llama_cpp as L
import numpy as np

from dynamo_run.engine import EngineError
from dynamo_run_llamacpp.config import LlamaCppSettings
from dynamo_run_llamacpp.native import Batch, context_params, new_context


class Embedder:
    """Mean-pooled, L2-normalised embeddings (the form OpenAI's API returns)."""

    def __init__(self, model: L.llama_model_p, settings: LlamaCppSettings, n_ctx: int) -> None:
        self.model = model
        self.settings = settings
        self.n_ctx = n_ctx
        self.ctx: L.llama_context_p | None = None
        self.batch: Batch | None = None
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        self.n_embd = L.llama_model_n_embd(model)

    def _open(self) -> tuple[L.llama_context_p, Batch]:
        if self.ctx is None:
            params = context_params(self.settings)
            params.n_ctx = self.n_ctx
            params.n_batch = params.n_ubatch = self.n_ctx
            params.n_seq_max = 1
            params.n_outputs_max_per_seq = 0
            params.embeddings = True
            params.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
            self.ctx = new_context(self.model, params)
            self.batch = Batch(self.n_ctx, 1)
        assert self.batch is not None
        return self.ctx, self.batch

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Runs on the scheduler thread. Raises EngineError for unusable inputs."""
        for i, ids in enumerate(inputs):
            if not ids:
                raise EngineError(f"input {i} is empty")
            if len(ids) > self.n_ctx:
                raise EngineError(
                    f"input {i} has {len(ids)} tokens; the embedding context is {self.n_ctx}"
                )
            if min(ids) < 0 or max(ids) >= self.n_vocab:
                raise EngineError(f"input {i} has a token id outside the vocabulary")
        ctx, batch = self._open()
        mem = L.llama_get_memory(ctx)
        vectors: list[list[float]] = []
        for ids in inputs:
            n = len(ids)
            L.llama_memory_clear(mem, True)
            batch.tokens[:n] = ids
            batch.pos[:n] = np.arange(n, dtype=np.int32)
            batch.seq[:n] = batch.seq_addr[0]
            batch.logits[:n] = 1
            rc = batch.decode(ctx, n)
            if rc != 0:
                raise EngineError(f"llama_decode returned {rc} while embedding")
            ptr = L.llama_get_embeddings_seq(ctx, 0)
            if not ptr:
                raise EngineError("this model produced no pooled embedding")
            vec = np.ctypeslib.as_array(ptr, (self.n_embd,)).astype(np.float64)
            norm = float(np.linalg.norm(vec))
            vectors.append((vec / norm if norm > 0 else vec).tolist())
        return vectors

    def close(self) -> None:
        if self.ctx is not None:
            L.llama_free(self.ctx)
            self.ctx = None
            self.batch = None
