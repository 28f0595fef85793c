"""Response caching: request keys, replay of cached answers, the semantic cache embedder."""
