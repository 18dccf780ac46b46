#!/usr/bin/env bash
# Build the single-file binary dist/dynamo-run with PyInstaller (several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh packaging
.venv/bin/pyinstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller packaging/dynamo-run.spec
echo "built: dist/dynamo-run ($(du -h dist/dynamo-run | cut -f1))"
