"""The HTTP front end: an asyncio-facing engine thread, the OpenAI-compatible API, Prometheus metrics."""
