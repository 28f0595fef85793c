"""RequestContext: what one request carries through the pipeline, router and provider."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from multidict import CIMultiDictProxy

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.pipeline.plugin import ShortCircuit

Endpoint = Literal["chat", "completions", "embeddings", "models"]


CAP_INJECTED = "access.cap_injected"
"""`ctx.state` key set when the gateway added the output cap itself (the client sent none): the
router then sends it in the field the deployment's provider takes."""

STREAM_END = "stream.end"
"""`ctx.state` key the client relay sets when it stops reading an upstream stream: "done"
(`[DONE]`), "error" (an in-band error event: OpenAI `data: {"error": …}`, or what an Anthropic
`error` event becomes) or "cut" (the body ended without `[DONE]`); absent when the client went
away first. The router reads it to judge the deployment."""


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: the team and key a client credential resolved to."""

    team: str
    key_id: str
    key_name: str | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    """Prompt tokens written to the provider's prompt cache (Anthropic's cache_creation_input_tokens;
    OpenAI reports none). Billed at the model's cache-write price; part of `prompt_tokens`."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0
        return cls(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            cached_tokens=_int(cached),
        )


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


class RequestContext:
    """Mutable per-request state. Plugins keep their own data in `state`."""

    __slots__ = (
        "answer",
        "body",
        "client_wants_usage",
        "deployment",
        "endpoint",
        "error",
        "headers",
        "overhead_s",
        "principal",
        "provider",
        "public_model",
        "request_id",
        "response_headers",
        "state",
        "status",
        "stream",
        "t_start",
        "ttfb_s",
        "upstream_s",
        "usage",
    )

    def __init__(
        self, request_id: str, endpoint: Endpoint, headers: CIMultiDictProxy[str]
    ) -> None:
        self.request_id = request_id
        self.endpoint: Endpoint = endpoint
        self.headers = headers
        self.t_start = time.perf_counter()
        self.body: dict[str, Any] | None = None
        self.public_model: str | None = None
        self.stream = False
        self.client_wants_usage = False
        self.principal: Principal | None = None
        self.provider: str | None = None
        self.deployment: str | None = None
        self.status = 0
        self.error: GatewayError | None = None
        self.usage: Usage | None = None
        self.upstream_s = 0.0
        """Seconds spent waiting on the upstream (whole call; for streams, until the last chunk)."""
        self.ttfb_s: float | None = None
        """Seconds from request start to the first byte sent to the client (streams)."""
        self.overhead_s: float | None = None
        self.state: dict[str, Any] = {}
        self.response_headers: dict[str, str] | None = None
        """Headers plugins add to the client's response (e.g. x-ratelimit-*), errors included."""
        self.answer: ShortCircuit | None = None
        """The answer an `on_lookup` hook found (an exact-cache hit); served once every `on_request`
        hook let the request in. `usage` is then the answer's usage, so its cost is known."""

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start
