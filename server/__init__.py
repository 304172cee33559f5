"""The HTTP front end: the engine in its own process, the OpenAI-compatible API, Prometheus metrics."""
