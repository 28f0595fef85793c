"""Admin API request and response bodies (pydantic), also the source of /admin/openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.store.base import (
    BudgetSpec,
    BudgetState,
    KeyRecord,
    Period,
    TeamRecord,
    nano_to_usd,
    usd_to_nano,
)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetIn(_In):
    limit_usd: float = Field(ge=0)
    period: Period = "monthly"

    def spec(self) -> BudgetSpec:
        return BudgetSpec(limit_nano=usd_to_nano(self.limit_usd), period=self.period)


class TeamCreate(_In):
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    name: str = Field(min_length=1, max_length=200)
    budget: BudgetIn | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    allowed_models: list[str] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class TeamUpdate(_In):
    name: str | None = Field(None, min_length=1, max_length=200)
    budget: BudgetIn | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    allowed_models: list[str] | None = None
    metadata: dict[str, Any] | None = None


class KeyCreate(_In):
    team_id: str = Field(min_length=1)
    name: str = Field("", max_length=200)
    budget: BudgetIn | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    allowed_models: list[str] | None = None
    expires_at: float | None = Field(None, description="UNIX time (UTC)")
    expires_in_s: float | None = Field(None, gt=0, description="alternative to expires_at")
    metadata: dict[str, Any] = Field(default_factory=dict)


class KeyUpdate(_In):
    name: str | None = Field(None, max_length=200)
    budget: BudgetIn | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    allowed_models: list[str] | None = None
    expires_at: float | None = None
    metadata: dict[str, Any] | None = None


class BudgetOut(BaseModel):
    limit_usd: float | None
    period: Period | None
    spent_usd: float
    reserved_usd: float
    remaining_usd: float | None
    period_start: float | None
    period_end: float | None
    resets_at: float | None
    forecast_usd: float | None = Field(
        description="spend at period end if the period's average rate so far continues"
    )


class TeamOut(BaseModel):
    id: str
    name: str
    budget: dict[str, Any] | None
    rpm: int | None
    tpm: int | None
    allowed_models: list[str] | None
    metadata: dict[str, Any]
    created_at: float


class KeyOut(BaseModel):
    id: str
    team_id: str
    name: str
    prefix: str
    budget: dict[str, Any] | None
    rpm: int | None
    tpm: int | None
    allowed_models: list[str] | None
    expires_at: float | None
    metadata: dict[str, Any]
    created_at: float
    revoked_at: float | None
    status: Literal["active", "revoked", "expired"]


class KeyCreated(KeyOut):
    key: str = Field(description="the secret key; shown once, never again")


class SpendRowOut(BaseModel):
    team_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    day: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class SpendOut(BaseModel):
    start: str
    end: str
    group_by: list[str]
    rows: list[SpendRowOut]
    total_usd: float


def budget_json(b: BudgetSpec | None) -> dict[str, Any] | None:
    return None if b is None else {"limit_usd": nano_to_usd(b.limit_nano), "period": b.period}


def team_out(t: TeamRecord) -> TeamOut:
    return TeamOut(
        id=t.id, name=t.name, budget=budget_json(t.budget), rpm=t.rpm, tpm=t.tpm,
        allowed_models=t.allowed_models, metadata=t.metadata, created_at=t.created_at,
    )


def key_status(k: KeyRecord, now: float) -> Literal["active", "revoked", "expired"]:
    if k.revoked_at is not None:
        return "revoked"
    if k.expires_at is not None and k.expires_at <= now:
        return "expired"
    return "active"


def key_out(k: KeyRecord, now: float) -> KeyOut:
    return KeyOut(
        id=k.id, team_id=k.team_id, name=k.name, prefix=k.prefix, budget=budget_json(k.budget),
        rpm=k.rpm, tpm=k.tpm, allowed_models=k.allowed_models, expires_at=k.expires_at,
        metadata=k.metadata, created_at=k.created_at, revoked_at=k.revoked_at,
        status=key_status(k, now),
    )


def budget_out(s: BudgetState, now: float) -> BudgetOut:
    limit = s.limit_nano
    forecast: float | None = None
    if limit is not None and s.period_start is not None and s.period_end is not None:
        elapsed = max(now - s.period_start, 60.0)
        length = s.period_end - s.period_start
        forecast = nano_to_usd(s.spent_nano) * length / elapsed
    return BudgetOut(
        limit_usd=None if limit is None else nano_to_usd(limit),
        period=s.period,
        spent_usd=nano_to_usd(s.spent_nano),
        reserved_usd=nano_to_usd(s.reserved_nano),
        remaining_usd=None if limit is None else nano_to_usd(max(limit - s.spent_nano - s.reserved_nano, 0)),
        period_start=s.period_start,
        period_end=s.period_end,
        resets_at=s.period_end,
        forecast_usd=forecast,
    )
