"""The error boundary: every failure becomes OpenAI error JSON here, and only here."""

from __future__ import annotations

import itertools
import logging
import secrets
import time
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


def overhead_header(seconds: float) -> str:
    """The value of `x-tollway-overhead-ms` for `seconds` of the gateway's own time."""
    return f"{seconds * 1000:.3f}"


def _overhead_s(request: web.Request, t0: float | None) -> float:
    """Gateway time so far, upstream time excluded: from the request's context when a handler
    made one, else since `t0` (when the error boundary saw the request)."""
    ctx = request_ctx(request)
    if ctx is not None:
        return ctx.elapsed() - ctx.upstream_s
    return time.perf_counter() - t0 if t0 is not None else 0.0


def render(request: web.Request, e: GatewayError, t0: float | None = None) -> web.Response:
    headers = {
        "Content-Type": "application/json",
        "x-request-id": request_id_of(request),
        "x-tollway-overhead-ms": overhead_header(_overhead_s(request, t0)),
    }
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
    """Renders every failure; also gives the responses of handlers that set no `x-request-id`
    (health, metrics, admin) that header and `x-tollway-overhead-ms`, so every response has both.
    The OpenAI handlers set them themselves (a stream's are sent before this returns)."""
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
    except GatewayError as e:
        return render(request, e, t0)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return render(request, _from_http(request, e), t0)
    except StoreUnavailable:
        return render(
            request,
            ServiceUnavailable(
                "The gateway's store is unreachable; try again shortly.", code="store_unavailable"
            ),
            t0,
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render(request, InternalError("The gateway hit an internal error."), t0)
    if not resp.prepared and "x-request-id" not in resp.headers:
        h = resp.headers
        h["x-request-id"] = request_id_of(request)
        h["x-tollway-overhead-ms"] = overhead_header(_overhead_s(request, t0))
    return resp
