"""Whether trtllm can run here, told without importing it (a leaf: the package and the
engine module both ask it)."""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "pip install 'dynamo-run[trtllm]' (its wheels come from NVIDIA's package index)"


def unusable_reason() -> str | None:
    """None if TensorRT-LLM is installed and an NVIDIA GPU is present, else why not. Looks
    only at the installed packages and the driver's device files: no tensorrt_llm import
    (which loads CUDA libraries and takes seconds)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return f"tensorrt-llm is not installed: {INSTALL_HINT}"
    from dynamo_run.devices import has_nvidia_gpu

    if not has_nvidia_gpu():
        return "no NVIDIA GPU found (trtllm needs CUDA)"
    return None
