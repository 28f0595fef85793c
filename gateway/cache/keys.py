"""Exact-cache keys: what makes two requests the same question, and which requests may be cached.

The key is the SHA-256 of a canonical JSON (orjson, sorted keys) of every request field that can
change the answer. `stream` and `stream_options` are left out on purpose: a streamed and a
non-streamed request share one entry (the gateway stores the complete answer and replays it in
either shape). `user` is left in: OpenAI uses it for abuse monitoring only, but a team may
rely on it to keep end users' answers apart, and keeping it can only cost hits, never give a
wrong one. Unknown fields are kept too (a provider-specific parameter may change the answer).
The partition (team id, or "shared") is a prefix of the key, so two teams never share an entry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.wire.tokens import max_output_tokens

_IGNORED = frozenset({"stream", "stream_options"})
"""Fields that change how the answer is delivered, not what it says."""

SHARED_PARTITION = "shared"


@dataclass(slots=True, frozen=True)
class Cacheability:
    """Whether a request may be read from and written to the cache, and why not."""

    read: bool
    write: bool
    reason: str | None = None


def canonical_request(
    public_model: str, endpoint: str, body: dict[str, Any], default_max_tokens: int | None = None
) -> bytes:
    """The canonical bytes hashed into the key (the public model replaces the body's `model`).

    `default_max_tokens`: the output cap the gateway sends when the client gave none (the model's
    `max_output_tokens`); it is part of the question, so a request without a cap and one with
    that cap share an entry, and answers cut at an old cap are not served once it changes."""
    doc = {k: v for k, v in body.items() if k not in _IGNORED}
    doc["model"] = public_model
    if default_max_tokens is not None and max_output_tokens(body) is None:
        doc["max_tokens"] = default_max_tokens
    return orjson.dumps(
        {"endpoint": endpoint, "request": doc}, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    )


def cache_key(
    partition: str, public_model: str, endpoint: str, body: dict[str, Any],
    default_max_tokens: int | None = None,
) -> str:
    """`<partition>:<endpoint>:<sha256 hex>`; the partition is the team id (or "shared")."""
    digest = hashlib.sha256(canonical_request(public_model, endpoint, body, default_max_tokens)).hexdigest()
    return f"{partition}:{endpoint}:{digest}"


def _number(v: Any, default: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return default
    return float(v)


def cache_control(header: str | None) -> tuple[bool, bool]:
    """(no_cache, no_store) from a `Cache-Control` request header."""
    if not header:
        return False, False
    tokens = {t.strip().split("=", 1)[0].lower() for t in header.split(",")}
    return "no-cache" in tokens, "no-store" in tokens


def cacheability(
    body: dict[str, Any],
    *,
    allow_temperature: bool,
    allow_n: bool,
    allow_tools: bool,
    cache_control_header: str | None,
) -> Cacheability:
    """The rules: sampling (temperature > 0; a missing temperature is the API default 1), n > 1
    and tools are not cached unless allowed; `no-cache` skips reading, `no-store` writing."""
    if not allow_temperature and _number(body.get("temperature"), 1.0) > 0:
        return Cacheability(False, False, "temperature")
    if not allow_n and _number(body.get("n"), 1.0) > 1:
        return Cacheability(False, False, "n")
    if not allow_tools and (body.get("tools") or body.get("functions")):
        return Cacheability(False, False, "tools")
    if not cache_control_header:
        return _READ_WRITE
    no_cache, no_store = cache_control(cache_control_header)
    reason = "cache-control" if no_cache and no_store else None
    return Cacheability(not no_cache, not no_store, reason)


_READ_WRITE = Cacheability(True, True)
