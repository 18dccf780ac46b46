#!/usr/bin/env bash
# Build the single file dist/dynamo-run (a few minutes):
#   1. PyInstaller one-folder build from packaging/dynamo-run.spec (build/pyinstaller/dist);
#   2. packaging/assemble.py writes packaging/launcher.sh followed by a tar.gz of that folder.
# The file unpacks itself once per build into ~/.cache/dynamo-run/VERSION-HASH and runs from
# there (see packaging/launcher.sh).
# Usage: bash packaging/build.sh [OUTPUT]        (default: dist/dynamo-run)
# Installs PyInstaller first (scripts/setup.sh packaging) when .venv does not have it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist/dynamo-run}"
work="${DYN_BUILD_DIR:-build/pyinstaller}"
if [ ! -x .venv/bin/pyinstaller ]; then
  bash scripts/setup.sh packaging
fi
start=$(date +%s)
.venv/bin/pyinstaller --noconfirm --clean --log-level WARN \
  --distpath "$work/dist" --workpath "$work/work" packaging/dynamo-run.spec
version=$(.venv/bin/python -c 'import dynamo_run; print(dynamo_run.__version__)')
.venv/bin/python packaging/assemble.py "$work/dist/dynamo-run" "$out" "$version"
echo "built: $out ($(du -h "$out" | cut -f1)) in $(($(date +%s) - start)) s"
