"""Admin API under /admin (keys, teams, budgets, spend) and a key's own GET /v1/budget."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, cast, get_args

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.api import admin_models as m
from gateway.api.keys import PIPELINE, SETTINGS, STORE
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from gateway.plugins.access import AccessPlugin, client_key, hash_key
from gateway.store.base import CacheStats, GroupBy, KeyRecord, Scope, Store, TeamRecord

KEY_PREFIX = "sk-tw-"
M = TypeVar("M", bound=BaseModel)
_GROUPS = frozenset(get_args(GroupBy))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _json(obj: Any, status: int = 200) -> web.Response:
    if isinstance(obj, BaseModel):
        body = obj.model_dump_json().encode()
    else:
        body = orjson.dumps(obj)
    return web.Response(body=body, status=status, content_type="application/json")


def _patch(record: TeamRecord | KeyRecord, body: BaseModel) -> None:
    """PATCH: only the fields the client sent change; `null` clears a budget, limit or list."""
    for f in body.model_fields_set:
        v = getattr(body, f)
        if f == "budget":
            v = v.spec() if v is not None else None
        elif f == "metadata" and v is None:
            v = {}
        elif f == "name" and v is None:
            continue
        setattr(record, f, v)


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class SemanticCacheAdmin(Protocol):
    """What the admin API needs of the semantic cache (its plugin, when configured). A protocol, so
    that this module never imports the plugin: the semantic extra (torch, faiss) is optional."""

    async def purge_index(self, team: str | None, model: str | None) -> int:
        """Drop the vectors of a team's partitions (or "shared") and/or a model (None: all) on this
        replica, and have the other replicas drop them; returns how many were dropped here."""
        ...

    async def index_entries(self, team: str | None = None) -> dict[str, int]:
        """Vectors in this replica's index per team (or only `team`)."""
        ...


class AdminRoutes:
    def __init__(self, app: web.Application, semantic: SemanticCacheAdmin | None = None) -> None:
        self.app = app
        self.semantic = semantic

    @property
    def store(self) -> Store:
        return self.app[STORE]

    def add_to(self, r: web.UrlDispatcher) -> None:
        r.add_get("/admin/openapi.json", self.openapi)
        r.add_post("/admin/teams", self.create_team)
        r.add_get("/admin/teams", self.list_teams)
        r.add_get("/admin/teams/{id}", self.get_team)
        r.add_patch("/admin/teams/{id}", self.update_team)
        r.add_get("/admin/teams/{id}/budget", self.team_budget)
        r.add_post("/admin/keys", self.create_key)
        r.add_get("/admin/keys", self.list_keys)
        r.add_get("/admin/keys/{id}", self.get_key)
        r.add_patch("/admin/keys/{id}", self.update_key)
        r.add_delete("/admin/keys/{id}", self.revoke_key)
        r.add_post("/admin/keys/{id}/revoke", self.revoke_key)
        r.add_post("/admin/keys/{id}/rotate", self.rotate_key)
        r.add_get("/admin/keys/{id}/budget", self.key_budget)
        r.add_get("/admin/spend", self.spend)
        r.add_delete("/admin/cache", self.cache_purge)
        r.add_get("/admin/cache/stats", self.cache_stats)
        r.add_get("/v1/budget", self.own_budget)
        r.add_get("/budget", self.own_budget)

    # ---- plumbing ----------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        admin = self.app[SETTINGS].admin.key
        if admin is None:
            raise PermissionDenied("The admin API is disabled: set admin.key in the config.")
        given = client_key(request.headers)
        if not given:
            raise AuthenticationFailed("The admin API needs 'Authorization: Bearer ADMIN_KEY'.")
        if not hmac.compare_digest(given.encode(), admin.get_secret_value().encode()):
            raise AuthenticationFailed("Incorrect admin key.")

    async def _body(self, request: web.Request, model: type[M]) -> M:
        raw = await request.read()
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or None
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            raise InvalidRequest(f"Invalid request body: {loc or 'body'}: {msg}", param=loc) from None

    async def _team(self, team_id: str) -> TeamRecord:
        t = await self.store.get_team(team_id)
        if t is None:
            raise NotFound(f"No team with id '{team_id}'.", param="id", code="team_not_found")
        return t

    async def _key(self, key_id: str) -> KeyRecord:
        k = await self.store.get_key(key_id)
        if k is None:
            raise NotFound(f"No key with id '{key_id}'.", param="id", code="key_not_found")
        return k

    def _check_models(self, models: list[str] | None) -> None:
        if models is None:
            return
        known = self.app[SETTINGS].models
        unknown = [x for x in models if x not in known]
        if unknown:
            raise InvalidRequest(
                f"allowed_models names unknown models: {', '.join(unknown)}", param="allowed_models"
            )

    # ---- teams -------------------------------------------------------------------------------

    async def create_team(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await self._body(request, m.TeamCreate)
        self._check_models(body.allowed_models)
        team_id = body.id or "team_" + secrets.token_hex(6)
        if await self.store.get_team(team_id) is not None:
            raise Conflict(f"A team with id '{team_id}' already exists.", param="id")
        team = TeamRecord(
            id=team_id, name=body.name, budget=body.budget.spec() if body.budget else None,
            rpm=body.rpm, tpm=body.tpm, allowed_models=body.allowed_models,
            metadata=body.metadata, created_at=time.time(),
        )
        await self.store.put_team(team)
        return _json(m.team_out(team), 201)

    async def list_teams(self, request: web.Request) -> web.Response:
        self._authorize(request)
        teams = sorted(await self.store.list_teams(), key=lambda t: t.created_at)
        return _json({"object": "list", "data": [m.team_out(t).model_dump() for t in teams]})

    async def get_team(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return _json(m.team_out(await self._team(request.match_info["id"])))

    async def update_team(self, request: web.Request) -> web.Response:
        self._authorize(request)
        team = await self._team(request.match_info["id"])
        body = await self._body(request, m.TeamUpdate)
        self._check_models(body.allowed_models)
        _patch(team, body)
        await self.store.put_team(team)
        return _json(m.team_out(team))

    async def team_budget(self, request: web.Request) -> web.Response:
        self._authorize(request)
        team = await self._team(request.match_info["id"])
        return _json(await self._budget(Scope("team", team.id, budget=team.budget)))

    async def _budget(self, scope: Scope) -> m.BudgetOut:
        now = time.time()
        return m.budget_out(await self.store.budget(scope, now), now)

    # ---- keys --------------------------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await self._body(request, m.KeyCreate)
        await self._team(body.team_id)
        self._check_models(body.allowed_models)
        now = time.time()
        expires = body.expires_at
        if body.expires_in_s is not None:
            expires = now + body.expires_in_s
        secret = new_key()
        key = KeyRecord(
            id="key_" + secrets.token_hex(8), team_id=body.team_id,
            key_hash=hashlib.sha256(secret.encode()).hexdigest(), prefix=secret[:10],
            name=body.name, budget=body.budget.spec() if body.budget else None, rpm=body.rpm,
            tpm=body.tpm, allowed_models=body.allowed_models, expires_at=expires,
            metadata=body.metadata, created_at=now,
        )
        await self.store.put_key(key)
        out = m.KeyCreated(**m.key_out(key, now).model_dump(), key=secret)
        return _json(out, 201)

    async def list_keys(self, request: web.Request) -> web.Response:
        self._authorize(request)
        team_id = request.query.get("team_id")
        now = time.time()
        keys = sorted(await self.store.list_keys(team_id), key=lambda k: k.created_at)
        return _json({"object": "list", "data": [m.key_out(k, now).model_dump() for k in keys]})

    async def get_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return _json(m.key_out(await self._key(request.match_info["id"]), time.time()))

    async def update_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        key = await self._key(request.match_info["id"])
        body = await self._body(request, m.KeyUpdate)
        self._check_models(body.allowed_models)
        _patch(key, body)
        await self.store.put_key(key)
        return _json(m.key_out(key, time.time()))

    async def revoke_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        key = await self._key(request.match_info["id"])
        if key.revoked_at is None:
            key.revoked_at = time.time()
            await self.store.put_key(key)
        return _json(m.key_out(key, time.time()))

    async def rotate_key(self, request: web.Request) -> web.Response:
        """A new secret for the same key id (same budget, limits, spend); the old one stops now."""
        self._authorize(request)
        key = await self._key(request.match_info["id"])
        if key.revoked_at is not None:
            raise InvalidRequest("A revoked key cannot be rotated.", param="id", code="key_revoked")
        secret = new_key()
        key.key_hash = hashlib.sha256(secret.encode()).hexdigest()
        key.prefix = secret[:10]
        await self.store.put_key(key)
        now = time.time()
        return _json(m.KeyCreated(**m.key_out(key, now).model_dump(), key=secret))

    async def key_budget(self, request: web.Request) -> web.Response:
        self._authorize(request)
        key = await self._key(request.match_info["id"])
        return _json(await self._budget(Scope("key", key.id, budget=key.budget)))

    async def own_budget(self, request: web.Request) -> web.Response:
        """A client key reads its own budget (and its team's), nobody else's."""
        access = next((p for p in request.app[PIPELINE].plugins if isinstance(p, AccessPlugin)), None)
        if access is None or access.open:
            raise NotFound("Budgets are not enabled on this gateway.", code="budgets_disabled")
        raw = client_key(request.headers)
        if not raw:
            raise AuthenticationFailed("You didn't provide an API key.", code="missing_api_key")
        key = await access.lookup(hash_key(raw))
        access.check_key(key, hash_key(raw))
        assert key is not None
        team = await self.store.get_team(key.team_id)
        out: dict[str, Any] = {
            "key": {"id": key.id, "name": key.name,
                    **(await self._budget(Scope("key", key.id, budget=key.budget))).model_dump()},
        }
        if team is not None:
            out["team"] = {"id": team.id, "name": team.name,
                           **(await self._budget(Scope("team", team.id, budget=team.budget))).model_dump()}
        return _json(out)

    # ---- spend -------------------------------------------------------------------------------

    async def spend(self, request: web.Request) -> web.Response:
        self._authorize(request)
        q = request.query
        today = datetime.now(UTC).date()
        try:
            end_d = datetime.strptime(q["end"], "%Y-%m-%d").date() if "end" in q else today
            start_d = (
                datetime.strptime(q["start"], "%Y-%m-%d").date()
                if "start" in q
                else end_d - timedelta(days=29)
            )
        except ValueError:
            raise InvalidRequest("start and end are dates: YYYY-MM-DD.", param="start") from None
        if start_d > end_d:
            raise InvalidRequest("start is after end.", param="start")
        groups = [g.strip() for g in q.get("group_by", "team,model,day").split(",") if g.strip()]
        bad = [g for g in groups if g not in _GROUPS]
        if bad:
            raise InvalidRequest(
                f"group_by takes team, key, model, day; not {', '.join(bad)}.", param="group_by"
            )
        start = datetime(start_d.year, start_d.month, start_d.day, tzinfo=UTC).timestamp()
        end = datetime(end_d.year, end_d.month, end_d.day, tzinfo=UTC).timestamp() + 86400
        rows = await self.store.query_spend(
            start, end, cast(list[GroupBy], groups), team_id=q.get("team_id")
        )
        out = m.SpendOut(
            start=start_d.isoformat(), end=end_d.isoformat(), group_by=groups,
            rows=[
                m.SpendRowOut(
                    team_id=r.team_id, key_id=r.key_id, model=r.model, day=r.day,
                    requests=r.requests, prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens, cost_usd=r.cost_nano / 1e9,
                )
                for r in rows
            ],
            total_usd=sum(r.cost_nano for r in rows) / 1e9,
        )
        return _json(out)

    # ---- response cache ----------------------------------------------------------------------

    async def cache_purge(self, request: web.Request) -> web.Response:
        """Delete cached answers of a team (its partition; "shared" for the shared one) and/or
        a model; with neither, all of them. The semantic cache's vectors of those answers go too:
        `semantic_deleted` counts those dropped on this replica (the others drop theirs when they
        next read the feed)."""
        self._authorize(request)
        q = request.query
        team, model = q.get("team_id") or None, q.get("model") or None
        deleted = await self.store.cache_purge(team, model)
        semantic = await self.semantic.purge_index(team, model) if self.semantic is not None else 0
        return _json({"deleted": deleted, "semantic_deleted": semantic, "team_id": team, "model": model})

    async def cache_stats(self, request: web.Request) -> web.Response:
        """Per team: live entries and their bytes (by partition), hits (exact_hits + semantic_hits)
        and misses (by caller), and semantic_entries: vectors in this replica's semantic index (by
        partition)."""
        self._authorize(request)
        team = request.query.get("team_id") or None
        stats = await self.store.cache_stats(team)
        vectors = await self.semantic.index_entries(team) if self.semantic is not None else {}
        out: dict[str, dict[str, int]] = {}
        for t in sorted(stats.keys() | vectors.keys()):
            st = stats.get(t) or CacheStats()
            out[t] = {**st.to_json(), "semantic_entries": vectors.get(t, 0)}
        return _json({"teams": out})

    # ---- OpenAPI -----------------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())


def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        m.BudgetIn, m.TeamCreate, m.TeamUpdate, m.KeyCreate, m.KeyUpdate, m.BudgetOut,
        m.TeamOut, m.KeyOut, m.KeyCreated, m.SpendRowOut, m.SpendOut,
    ]
    schemas: dict[str, Any] = {}
    for model in models:
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, d in s.pop("$defs", {}).items():
            schemas[name] = d
        schemas[model.__name__] = s

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def op(summary: str, out: str | None, body: str | None = None, status: str = "200",
           params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        o: dict[str, Any] = {
            "summary": summary,
            "security": [{"adminKey": []}],
            "responses": {
                status: {"description": "OK", **(
                    {"content": {"application/json": {"schema": ref(out)}}} if out else {})},
                "400": {"description": "invalid request"},
                "401": {"description": "missing or wrong admin key"},
                "404": {"description": "not found"},
            },
        }
        if body:
            o["requestBody"] = {"required": True,
                                "content": {"application/json": {"schema": ref(body)}}}
        if params:
            o["parameters"] = params
        return o

    pid = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    spend_params = [
        {"name": n, "in": "query", "required": False, "schema": {"type": "string"}, "description": d}
        for n, d in (
            ("start", "first day, YYYY-MM-DD (default: 29 days before end)"),
            ("end", "last day, YYYY-MM-DD (default: today, UTC)"),
            ("group_by", "comma-separated: team, key, model, day (default team,model,day)"),
            ("team_id", "only this team"),
        )
    ]
    paths: dict[str, Any] = {
        "/admin/teams": {
            "post": op("Create a team", "TeamOut", "TeamCreate", "201"),
            "get": op("List teams", None),
        },
        "/admin/teams/{id}": {
            "get": op("Get a team", "TeamOut", params=pid),
            "patch": op("Update a team", "TeamOut", "TeamUpdate", params=pid),
        },
        "/admin/teams/{id}/budget": {"get": op("A team's budget", "BudgetOut", params=pid)},
        "/admin/keys": {
            "post": op("Create a key (the secret is in the answer, once)", "KeyCreated", "KeyCreate",
                       "201"),
            "get": op("List keys", None, params=[{"name": "team_id", "in": "query",
                                                  "schema": {"type": "string"}}]),
        },
        "/admin/keys/{id}": {
            "get": op("Get a key", "KeyOut", params=pid),
            "patch": op("Update a key", "KeyOut", "KeyUpdate", params=pid),
            "delete": op("Revoke a key", "KeyOut", params=pid),
        },
        "/admin/keys/{id}/revoke": {"post": op("Revoke a key", "KeyOut", params=pid)},
        "/admin/keys/{id}/rotate": {
            "post": op("New secret for a key; the old one stops working", "KeyCreated", params=pid)
        },
        "/admin/keys/{id}/budget": {"get": op("A key's budget", "BudgetOut", params=pid)},
        "/admin/spend": {"get": op("Spend grouped over a date range", "SpendOut",
                                   params=spend_params)},
        "/admin/cache": {"delete": op("Purge cached answers by team and/or model", None, params=[
            {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
            for n in ("team_id", "model")
        ])},
        "/admin/cache/stats": {"get": op("Cache entries, bytes, hits (exact, semantic), misses and "
                                         "semantic index entries per team", None,
                                         params=[{"name": "team_id", "in": "query",
                                                  "schema": {"type": "string"}}])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tollway admin API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
        },
    }
