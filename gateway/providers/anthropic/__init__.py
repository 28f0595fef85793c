"""Anthropic Messages API upstreams, translated to and from the OpenAI chat format."""

from gateway.providers.anthropic.adapter import AnthropicAdapter

__all__ = ["AnthropicAdapter"]
