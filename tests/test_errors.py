"""Error statuses and bodies: what the SDK raises, and what raw HTTP clients get."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import USER_MESSAGES, StartGateway, assert_error_shape

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CHAT = "/v1/chat/completions"


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---- errors raised through the SDK --------------------------------------------------------


async def test_bad_client_key(fake: FakeUpstream, gateway: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway + "/v1", api_key="sk-not-a-valid-key-123", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as ei:
            await bad.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code == 401
    assert ei.value.code == "invalid_api_key"
    assert fake.requests == []


async def test_missing_client_key(fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession) -> None:
    payload = {"model": "gpt-test", "messages": USER_MESSAGES}
    async with http.post(gateway + CHAT, json=payload) as resp:
        assert resp.status == 401
        assert_error_shape(await resp.read())
    assert fake.requests == []


async def test_upstream_400_is_preserved(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(
        Behaviour(
            status=400,
            body={
                "error": {
                    "message": "Invalid 'messages[0].content': string too long.",
                    "type": "invalid_request_error",
                    "param": "messages[0].content",
                    "code": "string_above_max_length",
                }
            },
        )
    )
    with pytest.raises(openai.BadRequestError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    err = ei.value
    assert err.status_code == 400
    assert "Invalid 'messages[0].content': string too long." in err.message
    assert err.param == "messages[0].content"
    assert err.code == "string_above_max_length"
    assert err.type == "invalid_request_error"


async def test_unknown_model(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        await client.chat.completions.create(model="no-such-model", messages=USER_MESSAGES)
    assert ei.value.code == "model_not_found"
    assert fake.requests == []


async def test_upstream_429_keeps_retry_after(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(status=429, headers={"retry-after": "7", "retry-after-ms": "7000"}))
    with pytest.raises(openai.RateLimitError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code == 429
    assert ei.value.response.headers.get("retry-after") == "7"
    assert ei.value.response.headers.get("retry-after-ms") == "7000"
    assert len(fake.requests) == 1


async def test_upstream_500(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(status=500))
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code >= 500
    assert isinstance(ei.value.body, dict) and ei.value.body.get("message")


async def test_upstream_error_before_stream_is_a_status(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    # known before the first byte: a normal HTTP error, not 200 + an error event
    fake.enqueue(Behaviour(status=429, headers={"retry-after": "3"}))
    with pytest.raises(openai.RateLimitError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    assert ei.value.response.headers.get("retry-after") == "3"


async def test_upstream_rejects_provider_key_is_not_401(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    # a 401 would make the user distrust their own (valid) gateway key
    fake.enqueue(Behaviour(status=401))
    with pytest.raises(openai.APIStatusError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code in (500, 502)


async def test_upstream_unparsable_json_is_502(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(raw_body=b'{"id": "chatcmpl-1", "choices": [', status=200))
    payload = {"model": "gpt-test", "messages": USER_MESSAGES}
    async with http.post(gateway + CHAT, json=payload, headers=auth) as resp:
        assert resp.status == 502
        assert_error_shape(await resp.read())


async def test_upstream_unreachable_is_502(
    start_gateway: StartGateway, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(providers={"up": {"api_base": f"http://127.0.0.1:{closed_port()}/v1"}})
    payload = {"model": "gpt-test", "messages": USER_MESSAGES}
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    async with http.post(url + CHAT, json=payload, headers=headers) as resp:
        assert resp.status == 502
        assert_error_shape(await resp.read())
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code == 502


async def test_upstream_read_timeout_is_504(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys
) -> None:
    url = await start_gateway(providers={"up": {"timeouts": {"read_s": 0.3}}})
    fake.enqueue(Behaviour(delay_s=3.0))
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    elapsed = time.monotonic() - started
    assert ei.value.status_code == 504
    assert 0.25 <= elapsed < 2.0
    # the gateway let go of the upstream request
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.cancelled


# ---- raw HTTP: bad input never becomes a 500 ----------------------------------------------


@pytest.fixture
async def small_gateway(start_gateway: StartGateway) -> str:
    return await start_gateway(server={"max_body_bytes": 2048})


async def _post(
    http: aiohttp.ClientSession, url: str, data: Any, headers: dict[str, str]
) -> tuple[int, bytes, str]:
    async with http.post(url, data=data, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def test_malformed_json(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    status, body, ctype = await _post(http, gateway + CHAT, b'{"model": "gpt-test", "messages": [', headers)
    assert status == 400
    assert ctype.startswith("application/json")
    assert assert_error_shape(body)["type"] == "invalid_request_error"
    assert fake.requests == []


async def test_missing_model(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    data = orjson.dumps({"messages": USER_MESSAGES})
    status, body, _ = await _post(http, gateway + CHAT, data, headers)
    assert status == 400
    err = assert_error_shape(body)
    assert err["param"] == "model"
    assert err["type"] == "invalid_request_error"


async def test_body_too_large(
    fake: FakeUpstream, small_gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    big = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 4096}]})
    status, body, _ = await _post(http, small_gateway + CHAT, big, headers)
    assert status == 413
    assert_error_shape(body)
    assert fake.requests == []


async def test_body_too_large_chunked(
    fake: FakeUpstream, small_gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    # no Content-Length: the limit must hold while reading, too
    async def gen() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-test", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}]}'

    headers = {**auth, "Content-Type": "application/json"}
    status, body, _ = await _post(http, small_gateway + CHAT, gen(), headers)
    assert status == 413
    assert_error_shape(body)
    assert fake.requests == []


async def test_wrong_content_type(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "text/plain"}
    data = orjson.dumps({"model": "gpt-test", "messages": USER_MESSAGES})
    status, body, _ = await _post(http, gateway + CHAT, data, headers)
    assert status == 415
    assert_error_shape(body)
    assert fake.requests == []


@pytest.mark.parametrize("path", ["/v1/nope", "/nope", "/v1/chat/completions/extra"])
async def test_unknown_path(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], path: str
) -> None:
    async with http.post(gateway + path, json={"model": "gpt-test"}, headers=auth) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert_error_shape(await resp.read())
    async with http.get(gateway + path, headers=auth) as resp:
        assert resp.status == 404
        assert_error_shape(await resp.read())


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("GET", "/v1/embeddings"),
        ("GET", "/v1/completions"),
        ("POST", "/v1/models"),
    ],
)
async def test_wrong_method(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], method: str, path: str
) -> None:
    async with http.request(method, gateway + path, headers=auth) as resp:
        assert resp.status == 405
        assert resp.content_type == "application/json"
        assert_error_shape(await resp.read())


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b"null",
        b'"just a string"',
        b"42",
        b"",
        b"\xff\xfe{not utf-8",
        b'{"model": "gpt-test", "messages": [], "x": NaN',
    ],
    ids=["array", "null", "string", "number", "empty", "bad-utf8", "bad-json-nan"],
)
async def test_non_object_body_is_400(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], raw: bytes
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    status, body, _ = await _post(http, gateway + CHAT, raw, headers)
    assert status == 400
    assert_error_shape(body)
    assert fake.requests == []


@pytest.mark.parametrize(
    "payload",
    [
        {"model": 5, "messages": USER_MESSAGES},
        {"model": None, "messages": USER_MESSAGES},
        {"model": ["gpt-test"], "messages": USER_MESSAGES},
        {"model": "gpt-test", "messages": "hi"},
        {"model": "gpt-test"},
        {"model": "gpt-test", "messages": USER_MESSAGES, "stream": "yes"},
        {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True, "stream_options": "x"},
        {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True, "stream_options": []},
        {"model": "gpt-test", "messages": [None, 1, "x"]},
        {"model": "gpt-test", "messages": USER_MESSAGES, "n": "two", "max_tokens": "many"},
        {"model": "gpt-test", "messages": USER_MESSAGES, "tools": "none", "user": {"a": 1}},
    ],
)
async def test_bad_fields_never_500(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], payload: dict[str, Any]
) -> None:
    async with http.post(gateway + CHAT, json=payload, headers=auth) as resp:
        body = await resp.read()
        assert resp.status < 500, body
        if resp.status >= 400:
            assert_error_shape(body)


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/completions", {"prompt": "x"}),
    ],
)
async def test_missing_model_other_endpoints(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], path: str, payload: Any
) -> None:
    async with http.post(gateway + path, json=payload, headers=auth) as resp:
        assert resp.status == 400
        assert assert_error_shape(await resp.read())["param"] == "model"


@pytest.mark.parametrize(
    ("status", "raw", "content_type"),
    [
        (404, b'{"error": {"code": "DeploymentNotFound", "message": "No deployment."}}', None),
        (
            400,
            b'{"object": "error", "message": "bad thing", "type": "BadRequestError", '
            b'"param": null, "code": 400}',
            None,
        ),
        (502, b"<html><body>502 Bad Gateway</body></html>", "text/html"),
        (503, b"", "text/plain"),
    ],
    ids=["azure-shape", "vllm-flat", "html", "empty"],
)
async def test_upstream_error_bodies_normalised(
    fake: FakeUpstream,
    gateway: str,
    http: aiohttp.ClientSession,
    auth: dict[str, str],
    status: int,
    raw: bytes,
    content_type: str | None,
) -> None:
    fake.enqueue(Behaviour(status=status, raw_body=raw, content_type=content_type or "application/json"))
    payload = {"model": "gpt-azure", "messages": USER_MESSAGES}
    async with http.post(gateway + CHAT, json=payload, headers=auth) as resp:
        body = await resp.read()
        assert resp.status == status, body
        assert resp.content_type == "application/json"
    err = assert_error_shape(body)
    for v in (err["param"], err["code"]):
        assert v is None or isinstance(v, str)


async def test_upstream_drops_connection_is_502(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(cut_after=0))
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code == 502


async def test_stream_answered_with_json_is_502(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(raw_body=b'{"id": "x", "choices": []}'))
    payload = {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True}
    async with http.post(gateway + CHAT, json=payload, headers=auth) as resp:
        assert resp.status == 502
        assert_error_shape(await resp.read())


async def test_embeddings_endpoint_restriction(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    # embed-test serves embeddings only; chat on it is a client error, never forwarded
    with pytest.raises(openai.APIStatusError) as ei:
        await client.chat.completions.create(model="embed-test", messages=USER_MESSAGES)
    assert 400 <= ei.value.status_code < 500
    assert fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "sk-test-team-a-0001"},
        {"api-key": "wrong-key-12345"},
    ],
    ids=["empty-bearer", "basic", "no-scheme", "bad-api-key"],
)
async def test_bad_auth_headers_are_401(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    payload = {"model": "gpt-test", "messages": USER_MESSAGES}
    async with http.post(gateway + CHAT, json=payload, headers=headers) as resp:
        assert resp.status == 401
        assert assert_error_shape(await resp.read())["type"] == "invalid_request_error"
    assert fake.requests == []


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "application/json;charset=UTF-8"])
async def test_json_content_type_with_charset_accepted(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], ctype: str
) -> None:
    data = orjson.dumps({"model": "gpt-test", "messages": USER_MESSAGES})
    status, body, _ = await _post(http, gateway + CHAT, data, {**auth, "Content-Type": ctype})
    assert status == 200, body
