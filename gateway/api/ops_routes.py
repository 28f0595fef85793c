"""Operational routes: liveness and readiness."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.api.keys import LOOPMON, PIPELINE, READY, ROUTER, SETTINGS, STORE


async def health(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """Ready: config loaded, providers started, plugins healthy, not shutting down."""
    app = request.app
    state = app[READY]
    details: dict[str, Any] = {}
    ok = bool(state.get("started")) and not state.get("stopping")
    store_ok = await app[STORE].ping() if state.get("started") else False
    details["store"] = {"ok": store_ok}
    if not store_ok and app[SETTINGS].budgets.on_store_failure == "closed":
        ok = False
    for p in app[PIPELINE].plugins:
        h = p.health()
        if h is not None:
            details[p.name] = h
            ok = ok and bool(h.get("ok", True))
    router = app[ROUTER]
    breakers = router.health()
    body = {
        "status": "ready" if ok else "not_ready",
        "breakers": breakers,
        "models": len(app[ROUTER].routes),
        "stopping": bool(state.get("stopping")),
        "plugins": details,
        "event_loop": {"lag_max_ms_last_window": round(app[LOOPMON].last_window_max * 1000, 3)},
    }
    return web.Response(
        body=orjson.dumps(body), status=200 if ok else 503, content_type="application/json"
    )


def add_to(routes: web.UrlDispatcher) -> None:
    routes.add_get("/health", health)
    routes.add_get("/ready", ready)
