"""auth plugin: resolves the client's key to a team; no valid key, no service."""

from __future__ import annotations

import hashlib

from multidict import CIMultiDictProxy

from gateway.errors import AuthenticationFailed
from gateway.pipeline import Plugin, Principal, RequestContext
from gateway.settings import AuthSettings


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def client_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The key from `Authorization: Bearer …`, or `api-key` / `x-api-key` (Azure, Anthropic SDKs)."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("api-key") or headers.get("x-api-key")


class AuthPlugin(Plugin):
    """Static keys from config, kept only as SHA-256 digests; lookup is a hash-table probe."""

    name = "auth"

    def __init__(self, settings: AuthSettings) -> None:
        self.open = settings.mode == "none"
        self._keys: dict[bytes, Principal] = {}
        for k in settings.keys:
            digest = key_digest(k.key.get_secret_value())
            self._keys[digest] = Principal(team=k.team, key_id=digest.hex()[:16], key_name=k.name)

    async def on_headers(self, ctx: RequestContext) -> None:
        if self.open:
            ctx.principal = Principal(team="default", key_id="anonymous")
            return
        key = client_key(ctx.headers)
        if not key:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        principal = self._keys.get(key_digest(key))
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        ctx.principal = principal
