"""``in=grpc``: the KServe v2 / Triton gRPC input."""

import os

# grpc's C core logs its own errors to stderr; ours are one line each. Set before grpc is
# first imported; GRPC_VERBOSITY=debug (or any value) in the environment wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
