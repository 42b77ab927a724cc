"""dsv4 serve: the OpenAI-compatible HTTP server and the web chat page (see dsv4.serve.app)."""
