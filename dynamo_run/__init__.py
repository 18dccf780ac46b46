"""dynamo-run: a single-command local LLM runner."""

__version__ = "0.1.0"
