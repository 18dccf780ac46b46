"""in=http: the OpenAI-compatible HTTP server."""
