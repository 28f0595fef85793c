"""The `store:` section of the config: which backend holds keys, budgets and the ledger."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.envref import EnvStr


class StoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["embedded", "redis"] = "embedded"
    path: EnvStr = "data/tollway.db"
    """embedded: the SQLite file (its parent directory is created)."""
    url: EnvStr = "redis://127.0.0.1:6379/0"
    """redis: the server."""
    prefix: EnvStr = "tw:"
    """redis: every key name starts with this, so several gateways can share one server."""
    flush_interval_s: float = Field(default=1.0, gt=0)
    """embedded: how often buffered spend and ledger rows are written to disk."""
    socket_timeout_s: float = Field(default=1.0, gt=0)
    connect_timeout_s: float = Field(default=0.5, gt=0)
    ledger_max_records: int = Field(default=10_000_000, ge=0)
    """redis: the per-request ledger is a stream (`<prefix>ledger`) trimmed to about this many
    records (0: never trimmed; ~150 bytes of Redis memory each). Export it (XREAD) if every
    record must be kept for longer; the spend API's daily aggregates are kept for 400 days
    either way. The embedded store keeps every record in its SQLite file."""
