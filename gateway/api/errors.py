"""The error boundary: every failure becomes OpenAI error JSON here, and only here."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Iterator

from aiohttp import web

from gateway.api.keys import request_ctx
from gateway.errors import (
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from gateway.pipeline.plugin import Handler
from gateway.store.base import StoreUnavailable

log = logging.getLogger("tollway.api")


def request_id_of(request: web.Request) -> str:
    ctx = request_ctx(request)
    if ctx is not None:
        return ctx.request_id
    return incoming_request_id(request.headers.get("x-request-id"))


def incoming_request_id(rid: str | None) -> str:
    """The client's x-request-id when it is sane, else a fresh one."""
    if rid and len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    return next(_request_ids)


def _request_id_source() -> Iterator[str]:
    """req_ + 32 hex digits, like OpenAI's: a random per-process half and a counter (unique across
    replicas and restarts without a system call per request, as uuid4 needs)."""
    prefix = "req_" + secrets.token_hex(8)
    for n in itertools.count(int.from_bytes(secrets.token_bytes(4), "big")):
        yield f"{prefix}{n & 0xFFFFFFFFFFFFFFFF:016x}"


_request_ids = _request_id_source()


def render(request: web.Request, e: GatewayError) -> web.Response:
    headers = {"Content-Type": "application/json", "x-request-id": request_id_of(request)}
    ctx = request_ctx(request)
    if ctx is not None and ctx.response_headers:
        headers.update(ctx.response_headers)
    if e.headers:
        headers.update(e.headers)
    return web.Response(body=e.body(), status=e.status, headers=headers)


def _from_http(request: web.Request, e: web.HTTPException) -> GatewayError:
    if e.status == 404:
        return NotFound(f"Unknown request URL: {request.method} {request.path}")
    if e.status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        err = MethodNotAllowed(
            f"Method {request.method} is not allowed for {request.path}"
            + (f" (allowed: {allowed})" if allowed else "")
        )
        if allowed:
            err.headers["Allow"] = allowed
        return err
    if e.status == 413:
        return PayloadTooLarge(f"Request body is too large: {e.text or ''}".strip())
    return GatewayError(e.reason, status=e.status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as e:
        return render(request, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return render(request, _from_http(request, e))
    except StoreUnavailable:
        return render(
            request,
            ServiceUnavailable(
                "The gateway's store is unreachable; try again shortly.", code="store_unavailable"
            ),
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render(request, InternalError("The gateway hit an internal error."))
