"""Provider error normalisation and base64 embedding encoding for OpenAI-format upstreams."""

from __future__ import annotations

import base64
import struct

import orjson

from gateway.errors import BadGateway, UpstreamError
from gateway.providers.openai import translate


def test_openai_shaped_error_body_is_kept_byte_for_byte() -> None:
    raw = b'{"error": {"message": "bad param", "type": "invalid_request_error", "param": "x", "code": null}}'
    e = translate.upstream_error("up", 400, raw, {})
    assert isinstance(e, UpstreamError)
    assert e.status == 400 and e.body() == raw and e.param == "x"


def test_azure_error_without_type_gets_the_four_keys() -> None:
    raw = b'{"error": {"code": "DeploymentNotFound", "message": "no such deployment"}}'
    e = translate.upstream_error("az", 404, raw, {})
    err = orjson.loads(e.body())["error"]
    assert err == {
        "message": "no such deployment",
        "type": "invalid_request_error",
        "param": None,
        "code": "DeploymentNotFound",
    }


def test_vllm_flat_error_and_integer_code() -> None:
    raw = b'{"object": "error", "message": "too long", "type": "BadRequestError", "param": null, "code": 400}'
    e = translate.upstream_error("vllm", 400, raw, {})
    err = orjson.loads(e.body())["error"]
    assert err["message"] == "too long" and err["code"] == "400" and err["type"] == "BadRequestError"


def test_html_error_page_becomes_json() -> None:
    e = translate.upstream_error("up", 503, b"<html>Service Unavailable</html>", {"retry-after": "3"})
    assert e.status == 503 and e.headers == {"retry-after": "3"}
    err = orjson.loads(e.body())["error"]
    assert "Service Unavailable" in err["message"] and err["type"] == "server_error"


def test_provider_rejecting_gateway_credentials_is_502() -> None:
    e = translate.upstream_error("up", 401, b'{"error": {"message": "Incorrect API key"}}', {})
    assert isinstance(e, BadGateway) and e.status == 502 and "credentials" in e.message


def test_floats_to_base64_is_float32_little_endian() -> None:
    parsed = {"data": [{"index": 0, "embedding": [0.5, -1.0, 0.25]}]}
    out = orjson.loads(translate.floats_to_base64(parsed))
    raw = base64.b64decode(out["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == (0.5, -1.0, 0.25)


def test_azure_url() -> None:
    assert (
        translate.azure_url("https://r.openai.azure.com", "dep1", "chat", "2024-10-21")
        == "https://r.openai.azure.com/openai/deployments/dep1/chat/completions?api-version=2024-10-21"
    )
