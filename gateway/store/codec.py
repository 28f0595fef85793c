"""JSON encoding of team and key records, shared by both backends (and read by Redis Lua)."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.store.base import BudgetSpec, KeyRecord, TeamRecord


def team_to_dict(t: TeamRecord) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "budget": None if t.budget is None else t.budget.to_json(),
        "rpm": t.rpm,
        "tpm": t.tpm,
        "allowed_models": t.allowed_models,
        "metadata": t.metadata,
        "created_at": t.created_at,
    }


def team_from_dict(d: dict[str, Any]) -> TeamRecord:
    return TeamRecord(
        id=d["id"],
        name=d["name"],
        budget=BudgetSpec.from_json(d.get("budget")),
        rpm=d.get("rpm"),
        tpm=d.get("tpm"),
        allowed_models=d.get("allowed_models"),
        metadata=d.get("metadata") or {},
        created_at=float(d.get("created_at") or 0.0),
    )


def key_to_dict(k: KeyRecord) -> dict[str, Any]:
    return {
        "id": k.id,
        "team_id": k.team_id,
        "key_hash": k.key_hash,
        "prefix": k.prefix,
        "name": k.name,
        "budget": None if k.budget is None else k.budget.to_json(),
        "rpm": k.rpm,
        "tpm": k.tpm,
        "allowed_models": k.allowed_models,
        "expires_at": k.expires_at,
        "metadata": k.metadata,
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    }


def key_from_dict(d: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=d["id"],
        team_id=d["team_id"],
        key_hash=d["key_hash"],
        prefix=d["prefix"],
        name=d.get("name") or "",
        budget=BudgetSpec.from_json(d.get("budget")),
        rpm=d.get("rpm"),
        tpm=d.get("tpm"),
        allowed_models=d.get("allowed_models"),
        expires_at=d.get("expires_at"),
        metadata=d.get("metadata") or {},
        created_at=float(d.get("created_at") or 0.0),
        revoked_at=d.get("revoked_at"),
    )


def dump_team(t: TeamRecord) -> bytes:
    return orjson.dumps(team_to_dict(t))


def load_team(raw: bytes | str) -> TeamRecord:
    return team_from_dict(orjson.loads(raw))


def dump_key(k: KeyRecord) -> bytes:
    return orjson.dumps(key_to_dict(k))


def load_key(raw: bytes | str) -> KeyRecord:
    return key_from_dict(orjson.loads(raw))


def copy_team(t: TeamRecord) -> TeamRecord:
    """A detached copy, exactly what a round trip through storage gives back."""
    return load_team(dump_team(t))


def copy_key(k: KeyRecord) -> KeyRecord:
    return load_key(dump_key(k))
