"""The store package: the backend-neutral Store protocol, its records, and `create_store`."""

from __future__ import annotations

from gateway.store.base import (
    NANO,
    Admission,
    AdmitResult,
    AdmitStatus,
    BudgetSpec,
    BudgetState,
    GroupBy,
    KeyRecord,
    Period,
    RateInfo,
    Scope,
    ScopeKind,
    Settlement,
    SpendRecord,
    SpendRow,
    Store,
    StoreUnavailable,
    TeamRecord,
    nano_to_usd,
    period_bounds,
    period_id,
    usd_to_nano,
)
from gateway.store.settings import StoreSettings

__all__ = [
    "NANO",
    "Admission",
    "AdmitResult",
    "AdmitStatus",
    "BudgetSpec",
    "BudgetState",
    "GroupBy",
    "KeyRecord",
    "Period",
    "RateInfo",
    "Scope",
    "ScopeKind",
    "Settlement",
    "SpendRecord",
    "SpendRow",
    "Store",
    "StoreSettings",
    "StoreUnavailable",
    "TeamRecord",
    "create_store",
    "nano_to_usd",
    "period_bounds",
    "period_id",
    "usd_to_nano",
]


def create_store(settings: StoreSettings) -> Store:
    """The configured backend, not yet started (nothing connects or opens files until `start()`)."""
    if settings.backend == "redis":
        from gateway.store.redis_store import RedisStore  # redis is only needed for this backend

        return RedisStore(
            settings.url,
            prefix=settings.prefix,
            socket_timeout_s=settings.socket_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            ledger_max_records=settings.ledger_max_records,
        )
    from gateway.store.embedded import EmbeddedStore

    return EmbeddedStore(settings.path, flush_interval_s=settings.flush_interval_s)
