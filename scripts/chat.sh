#!/usr/bin/env bash
# Install what is needed (first run only) and start the chat shell on the default model.
# Extra arguments go to dynamo-run, e.g.: scripts/chat.sh out=echo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dynamo-run in=text "$@"
