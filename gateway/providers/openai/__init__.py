"""OpenAI-format upstreams: OpenAI itself, Azure OpenAI and any OpenAI-compatible server."""

from gateway.providers.openai.adapter import OpenAIAdapter

__all__ = ["OpenAIAdapter"]
