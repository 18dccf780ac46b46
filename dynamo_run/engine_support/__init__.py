"""Pieces that the engine adapters (dynamo-run-vllm, -sglang, -trtllm) share: one-line
start errors, capture of an engine's start-up output in a log file, and re-hashing of an
engine's KV events into our chained block hashes. Nothing heavy is imported here: the
adapters import these modules before (or without) their engine."""
