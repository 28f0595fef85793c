"""The Provider protocol: what the router asks of every upstream kind."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.pipeline.context import Endpoint
from gateway.settings import Timeouts


@dataclass(slots=True)
class UpstreamRequest:
    """One call to one deployment: the OpenAI-shaped body with the upstream model name set."""

    endpoint: Endpoint
    body: dict[str, Any]
    upstream_model: str
    stream: bool
    request_id: str
    timeouts: Timeouts | None = None
    """Per-deployment timeouts overriding the provider's."""


@dataclass(slots=True)
class Reply:
    """A complete successful (2xx) upstream answer, already in OpenAI shape."""

    status: int
    body: bytes
    parsed: Any
    """The body parsed as JSON (the gateway never relays a 200 it cannot parse)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Headers to pass on to the client."""
    cache_write_tokens: int = 0
    """Prompt tokens the upstream wrote to its prompt cache (not in the OpenAI usage JSON)."""


class UpstreamStream(Protocol):
    """A successful streaming answer: OpenAI SSE bytes as they arrive.

    Iteration raises a GatewayError (UpstreamTimeout, BadGateway…) if the upstream fails.
    `aclose()` must be called in every case; it frees or drops the connection.
    """

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def __anext__(self) -> Awaitable[bytes]: ...

    def aclose(self) -> Awaitable[None]: ...


class Provider(ABC):
    """An upstream account of one kind. Adapters translate and transport; they never retry."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connection pools (called once, inside the running event loop)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close connection pools."""

    @abstractmethod
    async def complete(self, req: UpstreamRequest) -> Reply:
        """Non-streaming call. Raises a GatewayError (UpstreamError for provider errors)."""

    @abstractmethod
    async def open_stream(self, req: UpstreamRequest) -> UpstreamStream:
        """Streaming call; returns once the upstream accepted it (errors before that raise)."""
