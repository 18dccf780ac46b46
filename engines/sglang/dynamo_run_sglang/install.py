"""Whether sglang can run here, told without importing it (a leaf: the package and the
engine module both ask it)."""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "pip install 'dynamo-run[sglang]'"


def unusable_reason() -> str | None:
    """None if SGLang is installed and an NVIDIA GPU is present, else why not. Looks only
    at the installed packages and the driver's device files: no sglang or torch import."""
    if importlib.util.find_spec("sglang") is None:
        return f"sglang is not installed: {INSTALL_HINT}"
    from dynamo_run.devices import has_nvidia_gpu

    if not has_nvidia_gpu():
        return "no NVIDIA GPU found (sglang needs CUDA)"
    return None
