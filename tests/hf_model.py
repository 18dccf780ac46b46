"""A Hugging Face folder of the default model, made from its GGUF without any download.

The HF engines (vLLM here) load Hugging Face folders, not GGUF files. transformers can read
the default model's GGUF (with the ``gguf`` and ``accelerate`` packages: the extra
``dynamo-run[hf-from-gguf]``) and save it as safetensors; the folder is made once and kept
in a cache shared by tests and benchmarks (``~/.cache/dynamo-run/test-models``, or
``DYNAMO_RUN_TEST_MODELS``).

The conversion runs in a child process (``python tests/hf_model.py``), so the caller does
not keep transformers' copy of the weights in memory. Run it directly to make the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(
    os.environ.get("DYNAMO_RUN_TEST_MODELS", "~/.cache/dynamo-run/test-models")
).expanduser()
DTYPE = "bfloat16"  # what vLLM runs on the CPU; halves the 538 MB of float32
_DONE = "dynamo-run-made-from.json"


class HfModelError(RuntimeError):
    """The folder cannot be made here (a package is missing, or the conversion failed)."""


def _gguf() -> Path:
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from dynamo_run.model.resolve import default_model_path

    return default_model_path()


def _stamp(gguf: Path) -> dict[str, object]:
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "dtype": DTYPE}


def default_hf_folder() -> Path:
    """The cached HF folder of the default model, made on first use (about 20 s).
    Raises HfModelError with the reason if it cannot be made."""
    gguf = _gguf()
    dest = CACHE / f"{gguf.stem}-{DTYPE}"
    stamp = _stamp(gguf)
    done = dest / _DONE
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session or benchmark may be making it
        if done.is_file() and json.loads(done.read_text()) == stamp:
            return dest
        work = dest.with_name(dest.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, __file__, str(gguf), str(work)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise HfModelError(lines[-1] if lines else f"exit code {proc.returncode}")
        (work / _DONE).write_text(json.dumps(stamp))
        shutil.rmtree(dest, ignore_errors=True)
        work.rename(dest)
    return dest


def convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantised), save it as an HF folder in ``DTYPE``."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise HfModelError(
            f"{exc}; install 'dynamo-run[hf-from-gguf]' (transformers, gguf, accelerate)"
        ) from exc
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, DTYPE)
    )
    # The weights are plain tensors now; the GGUF "quantizer" would make save_pretrained
    # refuse (or write a quantization_config vLLM then tries to honour).
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _keep_chat_template(gguf, out)


def _keep_chat_template(gguf: Path, out: Path) -> None:
    """The GGUF's chat template, where transformers did not carry it over."""
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("chat_template") or (out / "chat_template.jinja").is_file():
        return
    from dynamo_run.model.gguf_meta import read_gguf_metadata

    template = read_gguf_metadata(gguf).get("tokenizer.chat_template")
    if template:
        (out / "chat_template.jinja").write_text(template)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        try:
            convert(Path(sys.argv[1]), Path(sys.argv[2]))
        except HfModelError as exc:
            sys.exit(f"hf_model: {exc}")
    else:
        print(default_hf_folder())
