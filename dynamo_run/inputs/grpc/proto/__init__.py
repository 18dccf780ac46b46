"""Generated KServe v2 / Triton protocol messages (scripts/gen_grpc_proto.sh)."""
