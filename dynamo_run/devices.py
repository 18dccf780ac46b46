"""Cheap checks for the accelerators an engine may need, without importing torch.

``dynamo-run --help`` and ``out=auto`` ask every installed engine whether it can run here;
importing torch (seconds) to find out would make both slow, so these look at what the
drivers expose in /dev and /proc instead.
"""

from __future__ import annotations

import glob
import os
import shutil


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver with at least one device is present (CUDA_VISIBLE_DEVICES="" or
    "-1" hides them, as it does from CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") and shutil.which("nvidia-smi") is not None


def no_nvidia_gpu_reason() -> str | None:
    """None where an NVIDIA GPU is present, else the one line an engine reports."""
    return None if has_nvidia_gpu() else "no NVIDIA GPU found"
