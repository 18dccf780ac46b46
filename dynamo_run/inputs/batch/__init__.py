"""in=batch:FILE: JSONL in, JSONL out, with resume."""
