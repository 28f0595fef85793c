"""The semantic cache's feed records: what one replica appends to the store's feed (`Store.cache_feed_add`)
and the others read, encoded to bytes and decoded back.

Every record is a JSON header (no raw newline inside), a newline, then a body. The header's "kind" says what
it is; a record without one is an "add" (the only kind there was at first):

- add:   {"r": replica, "p": partition, "m": model, "t": last user text, "k": cache key, "x": expiry (UNIX s),
         "a": when it was indexed (UNIX s; absent in old records: older than any purge)}, body: the float32
         vector.
- purge: {"kind": "purge", "r": replica, "team": partition name or null, "m": model or null, "ts": when
         (UNIX s)}, empty body. Replicas that predate it drop it as malformed (its body is not a vector).

A record of a kind this version does not know decodes to None (skipped), so adding a kind later does not
break the replicas that predate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson


@dataclass(frozen=True, slots=True)
class FeedAdd:
    replica: str
    partition: str
    model: str
    text: str
    key: str
    vec: npt.NDArray[np.float32]
    expires: float
    at: float


@dataclass(frozen=True, slots=True)
class FeedPurge:
    replica: str
    team: str | None
    model: str | None
    ts: float


class FeedError(ValueError):
    """A feed record of a known kind that cannot be decoded."""


def encode_feed_entry(
    replica: str,
    partition: str,
    model: str,
    text: str,
    key: str,
    vec: npt.NDArray[np.float32],
    expires: float,
    at: float,
) -> bytes:
    """An add record: the header, a newline, the float32 vector's bytes."""
    header = {"r": replica, "p": partition, "m": model, "t": text, "k": key, "x": expires, "a": at}
    return orjson.dumps(header) + b"\n" + np.ascontiguousarray(vec, dtype=np.float32).tobytes()


def encode_purge_entry(replica: str, team: str | None, model: str | None, ts: float) -> bytes:
    """A purge record: the header and a newline (no body)."""
    return orjson.dumps({"kind": "purge", "r": replica, "team": team, "m": model, "ts": ts}) + b"\n"


def _opt_str(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise FeedError(f"expected a string or null, got {type(v).__name__}")
    return v


def decode_feed_entry(raw: bytes, dim: int) -> FeedAdd | FeedPurge | None:
    """The record `raw`; None for a kind this version does not know. Raises FeedError when malformed."""
    head, sep, blob = raw.partition(b"\n")
    if not sep:
        raise FeedError("no header")
    try:
        h = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise FeedError(f"header is not JSON: {e}") from None
    if not isinstance(h, dict):
        raise FeedError("header is not an object")
    kind = h.get("kind", "add")
    try:
        if kind == "add":
            if len(blob) != dim * 4:
                raise FeedError(f"vector of {len(blob)} bytes, expected {dim * 4}")
            return FeedAdd(
                replica=str(h["r"]), partition=str(h["p"]), model=str(h["m"]), text=str(h["t"]),
                key=str(h["k"]), vec=np.frombuffer(blob, dtype=np.float32).copy(), expires=float(h["x"]),
                at=float(h.get("a", 0.0)),
            )
        if kind == "purge":
            return FeedPurge(
                replica=str(h["r"]), team=_opt_str(h.get("team")), model=_opt_str(h.get("m")),
                ts=float(h["ts"]),
            )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FeedError):
            raise
        raise FeedError(f"bad {kind} record: {e!r}") from None
    return None
