"""Typed AppKeys through which handlers reach the components create_app built."""

from __future__ import annotations

from aiohttp import web

from gateway.loopmon import LoopLagMonitor
from gateway.pipeline import Pipeline, RequestContext
from gateway.routing import Router
from gateway.settings import Settings
from gateway.store.base import Store

SETTINGS = web.AppKey("settings", Settings)
ROUTER = web.AppKey("router", Router)
PIPELINE = web.AppKey("pipeline", Pipeline)
READY = web.AppKey("ready", dict[str, bool])
LOOPMON = web.AppKey("loopmon", LoopLagMonitor)
STORE = web.AppKey("store", Store)
CTX = web.RequestKey("ctx", RequestContext)
"""Request-scoped key under which handlers leave their RequestContext for the error renderer."""


def request_ctx(request: web.Request) -> RequestContext | None:
    return request.get(CTX)
