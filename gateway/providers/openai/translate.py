"""Pure request/response shaping for OpenAI-format upstreams (URLs, errors, embeddings)."""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

import orjson

from gateway.errors import BadGateway, GatewayError, UpstreamError
from gateway.pipeline.context import Endpoint

PATHS: dict[Endpoint, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "models": "/models",
}

PASSED_ERROR_HEADERS = ("retry-after", "retry-after-ms")


def openai_url(api_base: str, endpoint: Endpoint) -> str:
    return api_base + PATHS[endpoint]


def azure_url(api_base: str, deployment: str, endpoint: Endpoint, api_version: str) -> str:
    return f"{api_base}/openai/deployments/{deployment}{PATHS[endpoint]}?api-version={api_version}"


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _str_or_none(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else str(v)


def upstream_error(
    provider: str, status: int, raw: bytes, headers: dict[str, str]
) -> GatewayError:
    """Turn a provider's error answer into the error the client gets.

    OpenAI-shaped bodies are kept byte for byte; others (Azure without `type`, vLLM's flat
    bodies, HTML from a proxy) are rewritten into the four-key OpenAI envelope. The provider
    rejecting the gateway's own credentials is a 502: a 401 would blame the client's key.
    """
    try:
        parsed: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    inner: dict[str, Any] | None = None
    if isinstance(parsed, dict):
        e = parsed.get("error")
        if isinstance(e, dict):
            inner = e
        elif isinstance(e, str):
            inner = {"message": e}
        elif "message" in parsed:
            inner = parsed
    if inner is not None:
        message = str(inner.get("message") or f"upstream returned HTTP {status}")
        type_ = inner.get("type") if isinstance(inner.get("type"), str) else _default_type(status)
        param = _str_or_none(inner.get("param"))
        code = _str_or_none(inner.get("code"))
    else:
        text = raw[:300].decode("utf-8", "replace").strip()
        message = f"upstream returned HTTP {status}" + (f": {text}" if text else "")
        type_, param, code = _default_type(status), None, None

    if status in (401, 403):
        err = BadGateway(
            f"provider {provider} rejected the gateway's credentials (HTTP {status}): {message}",
            code="upstream_auth_failed",
        )
        err.retryable = False  # the same key will not work a moment later (other deployments may)
        return err
    keep_raw = (
        inner is not None
        and parsed.get("error") is inner
        and all(k in inner for k in ("message", "type", "param", "code"))
        and isinstance(inner.get("type"), str)
    )
    body = raw if keep_raw else orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )
    return UpstreamError(
        message, status=status, raw_body=body, headers=headers, param=param, code=code
    )


def invalid_json_reply(provider: str, status: int) -> GatewayError:
    return BadGateway(
        f"provider {provider} answered HTTP {status} with a body that is not valid JSON",
        code="upstream_invalid_response",
    )


def floats_to_base64(parsed: dict[str, Any]) -> bytes:
    """Encode float embeddings as base64 float32 little-endian, as OpenAI does for base64."""
    for item in parsed.get("data") or ():
        emb = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(emb, list):
            arr = array("f", (float(x) for x in emb))
            if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte floats
                raise ValueError("float32 not available")
            if sys.byteorder != "little":  # pragma: no cover
                arr.byteswap()
            item["embedding"] = base64.b64encode(arr.tobytes()).decode("ascii")
    return orjson.dumps(parsed)
