"""Thin helpers over llama-cpp-python's ctypes API: logging, model and context creation, and
a reusable ``llama_batch`` whose arrays are numpy views, so a step's batch is written with
slice assignments instead of one ctypes call per token."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import llama_cpp.llama_cpp as L
import numpy as np

from dynamo_run.engine import EngineError
from dynamo_run_llamacpp.config import LlamaCppSettings


@L.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Drop llama.cpp's log lines (it prints hundreds while loading a model)."""


_backend_lock = threading.Lock()
_backend_ready = False


def init_backend(verbose: bool) -> None:
    """Initialise ggml once per process and route its logging."""
    global _backend_ready
    with _backend_lock:
        if not verbose:
            # ``_quiet_log`` is module-level, so the callback outlives every engine.
            L.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        if not _backend_ready:
            L.llama_backend_init()
            _backend_ready = True


def load_model(path: Path, settings: LlamaCppSettings) -> L.llama_model_p:
    params = L.llama_model_default_params()
    params.n_gpu_layers = settings.n_gpu_layers if settings.n_gpu_layers >= 0 else 999
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise EngineError(f"llamacpp: cannot load model from {path} (not a valid GGUF file?)")
    return model


def context_params(settings: LlamaCppSettings) -> L.llama_context_params:
    params = L.llama_context_default_params()
    params.n_ctx = settings.n_ctx
    params.n_batch = settings.n_batch
    params.n_ubatch = settings.n_ubatch
    params.n_seq_max = settings.n_parallel
    params.n_threads = settings.n_threads
    params.n_threads_batch = settings.n_threads_batch
    params.no_perf = True
    params.kv_unified = settings.kv_unified
    if settings.flash_attn is None:
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO
    elif settings.flash_attn:
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    else:
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return params


def new_context(model: L.llama_model_p, params: L.llama_context_params) -> L.llama_context_p:
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise EngineError(
            f"llamacpp: cannot create a context (n_ctx={params.n_ctx}, "
            f"n_seq_max={params.n_seq_max}); try a smaller n_ctx or n_parallel"
        )
    return ctx


class Batch:
    """A ``llama_batch`` over memory we own. ``tokens``, ``pos``, ``logits`` and ``seq``
    (the per-token ``seq_id`` pointers, as addresses) are numpy views of that memory."""

    def __init__(self, capacity: int, n_seq: int) -> None:
        self.capacity = capacity
        self._token = (ctypes.c_int32 * capacity)()
        self._pos = (ctypes.c_int32 * capacity)()
        self._n_seq_id = (ctypes.c_int32 * capacity)()
        self._seq_id = (ctypes.c_void_p * capacity)()
        self._logits = (ctypes.c_int8 * capacity)()
        # One constant one-element seq_id array per sequence; tokens point at theirs.
        self._seq_arrays = [(ctypes.c_int32 * 1)(i) for i in range(n_seq)]
        self.seq_addr = np.array([ctypes.addressof(a) for a in self._seq_arrays], dtype=np.uintp)

        self.tokens = np.ctypeslib.as_array(self._token)
        self.pos = np.ctypeslib.as_array(self._pos)
        self.logits = np.ctypeslib.as_array(self._logits)
        self.seq = np.frombuffer(self._seq_id, dtype=np.uintp)
        np.ctypeslib.as_array(self._n_seq_id)[:] = 1

        self.struct = L.llama_batch()
        self.struct.token = ctypes.cast(self._token, ctypes.POINTER(L.llama_token))
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.struct.pos = ctypes.cast(self._pos, ctypes.POINTER(L.llama_pos))
        self.struct.n_seq_id = ctypes.cast(self._n_seq_id, ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(
            self._seq_id, ctypes.POINTER(ctypes.POINTER(L.llama_seq_id))
        )
        self.struct.logits = ctypes.cast(self._logits, ctypes.POINTER(ctypes.c_int8))

    def decode(self, ctx: L.llama_context_p, n_tokens: int) -> int:
        self.struct.n_tokens = n_tokens
        return L.llama_decode(ctx, self.struct)
