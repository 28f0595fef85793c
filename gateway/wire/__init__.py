"""OpenAI wire-format helpers: SSE framing and request validation."""
