"""HTTP handlers: OpenAI routes, ops routes, and the one place errors become responses."""
