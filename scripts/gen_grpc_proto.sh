#!/usr/bin/env bash
# Regenerate dynamo_run/inputs/grpc/proto/*_pb2.py from the .proto files beside them.
# The generated modules are checked in, so neither building nor running needs grpcio-tools.
#
# Needs grpcio-tools paired with protobuf 6 (its protoc writes protobuf-6 code), in any Python:
#   python3 -m venv /tmp/protoc && /tmp/protoc/bin/pip install 'grpcio-tools==1.76.*'
#   PROTOC_PYTHON=/tmp/protoc/bin/python scripts/gen_grpc_proto.sh
#
# protoc's output is then adjusted (see fix() below) so that the messages live in a private
# descriptor pool: tritonclient registers the same `inference.*` names in protobuf's default
# pool, and both must load in one process (the tests, the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PROTOC_PYTHON:-python3}"
dir=dynamo_run/inputs/grpc/proto
"$python" -m grpc_tools.protoc -I "$dir" --python_out="$dir" \
  "$dir/model_config.proto" "$dir/grpc_service.proto"
"$python" - "$dir" <<'PY'
import re
import sys
from pathlib import Path

def fix(path: Path) -> None:
    text = path.read_text()
    # The private pool instead of the default one.
    text = text.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from dynamo_run.inputs.grpc.proto._pool import POOL\n",
    )
    text = text.replace("_descriptor_pool.Default()", "POOL")
    # No check that protobuf is at least protoc's version: the code only uses the builder
    # API, which protobuf 5 and 6 both have.
    text = re.sub(r"from google\.protobuf import runtime_version as _runtime_version\n", "", text)
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text, flags=re.S)
    # Imports between the generated modules are relative to this package.
    text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
    path.write_text(text)

for name in ("model_config_pb2.py", "grpc_service_pb2.py"):
    fix(Path(sys.argv[1]) / name)
PY
echo "generated $dir/model_config_pb2.py $dir/grpc_service_pb2.py" >&2
