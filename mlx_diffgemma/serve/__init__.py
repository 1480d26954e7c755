"""The OpenAI-compatible server: request parsing, the engine and its prompt cache, HTTP."""
