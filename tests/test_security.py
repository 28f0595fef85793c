"""Credentials and request ids: what reaches the upstream, what comes back to the client."""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

import aiohttp
import openai
import pytest
from helpers import USER_MESSAGES, StartGateway

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CHAT = "/v1/chat/completions"
PAYLOAD = {"model": "gpt-test", "messages": USER_MESSAGES}


def assert_no_client_key(fake: FakeUpstream, keys: TestKeys) -> None:
    for rec in fake.requests:
        for name, value in rec.headers.items():
            assert keys.team_a not in value, f"client key leaked upstream in {name}"
            assert keys.team_b not in value, f"client key leaked upstream in {name}"
        assert keys.team_a.encode() not in rec.raw_body


async def test_openai_compatible_gets_provider_key_not_client_key(
    fake: FakeUpstream, client: openai.AsyncOpenAI, keys: TestKeys
) -> None:
    await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    rec = fake.last
    assert rec.headers.getall("Authorization") == [f"Bearer {keys.upstream}"]
    assert "api-key" not in rec.headers
    assert_no_client_key(fake, keys)


async def test_openai_kind_gets_its_key(
    fake: FakeUpstream, client: openai.AsyncOpenAI, keys: TestKeys
) -> None:
    await client.chat.completions.create(model="gpt-openai", messages=USER_MESSAGES)
    rec = fake.last
    assert rec.path == "/v1/chat/completions"
    assert rec.headers.getall("Authorization") == [f"Bearer {keys.openai}"]
    assert_no_client_key(fake, keys)


async def test_azure_gets_api_key_deployment_and_version(
    fake: FakeUpstream, client: openai.AsyncOpenAI, keys: TestKeys
) -> None:
    await client.chat.completions.create(model="gpt-azure", messages=USER_MESSAGES)
    rec = fake.last
    assert rec.path == "/openai/deployments/chat-deployment-1/chat/completions"
    assert rec.deployment == "chat-deployment-1"
    assert rec.query.getall("api-version") == ["2024-10-21"]
    assert rec.headers.getall("api-key") == [keys.azure]
    assert "Authorization" not in rec.headers
    assert_no_client_key(fake, keys)


async def test_streaming_request_also_swaps_keys(
    fake: FakeUpstream, client: openai.AsyncOpenAI, keys: TestKeys
) -> None:
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    async for _ in stream:
        pass
    assert fake.last.headers["Authorization"] == f"Bearer {keys.upstream}"
    assert_no_client_key(fake, keys)


@pytest.mark.parametrize("header", ["api-key", "x-api-key"])
async def test_alternative_client_key_headers_not_forwarded(
    fake: FakeUpstream,
    gateway: str,
    http: aiohttp.ClientSession,
    keys: TestKeys,
    header: str,
) -> None:
    async with http.post(gateway + CHAT, json=PAYLOAD, headers={header: keys.team_a}) as resp:
        assert resp.status == 200, await resp.text()
    assert fake.last.headers["Authorization"] == f"Bearer {keys.upstream}"
    assert_no_client_key(fake, keys)


async def test_client_extra_credentials_not_forwarded(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    headers = {
        "Authorization": f"Bearer {keys.team_a}",
        "Cookie": "session=secret-cookie-value",
        "Proxy-Authorization": "Basic c2VjcmV0",
    }
    async with http.post(gateway + CHAT, json=PAYLOAD, headers=headers) as resp:
        assert resp.status == 200
    rec = fake.last
    assert "Cookie" not in rec.headers
    assert "Proxy-Authorization" not in rec.headers
    assert_no_client_key(fake, keys)


async def test_provider_key_never_reaches_client(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    for model in ("gpt-test", "gpt-azure", "gpt-openai"):
        async with http.post(gateway + CHAT, json={**PAYLOAD, "model": model}, headers=headers) as resp:
            body = await resp.read()
            seen = body + b"".join(v.encode() for v in resp.headers.values())
        for secret in (keys.upstream, keys.azure, keys.openai):
            assert secret.encode() not in seen


async def test_team_b_key_works(fake: FakeUpstream, gateway: str, keys: TestKeys) -> None:
    async with openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=keys.team_b, max_retries=0) as c:
        r = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert r.choices[0].message.content
    assert_no_client_key(fake, keys)


async def test_client_request_id_echoed_and_forwarded(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    headers = {"Authorization": f"Bearer {keys.team_a}", "x-request-id": "client-req-42"}
    async with http.post(gateway + CHAT, json=PAYLOAD, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers.getall("x-request-id") == ["client-req-42"]
    assert fake.last.headers.getall("x-request-id") == ["client-req-42"]


async def test_request_id_generated(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    ids = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=USER_MESSAGES)
        rid = raw.headers.get("x-request-id")
        assert rid, "no x-request-id on the response"
        assert not rid.startswith("req_fakeupstream"), "upstream's id returned as the gateway's"
        ids.append(rid)
        assert raw.parse().choices  # the body is intact
    assert ids[0] != ids[1]


async def test_request_id_and_on_errors(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    async with http.post(gateway + CHAT, json=PAYLOAD, headers={"x-request-id": "r-401"}) as resp:
        assert resp.status == 401
        assert resp.headers.get("x-request-id") == "r-401"
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    async with http.post(gateway + CHAT, data=b"{", headers=headers) as resp:
        assert resp.status in (400, 415)
        assert resp.headers.get("x-request-id")


async def test_overhead_header(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=USER_MESSAGES)
    value = raw.headers.get("x-tollway-overhead-ms")
    assert value is not None
    assert re.fullmatch(r"\d+(\.\d+)?", value), value
    assert 0 <= float(value) < 1000


async def test_overhead_header_on_stream(client: openai.AsyncOpenAI) -> None:
    async with client.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=USER_MESSAGES, stream=True
    ) as resp:
        value = resp.headers.get("x-tollway-overhead-ms")
        assert value is not None
        float(value)
        assert resp.headers.get("x-request-id")


SECRET_PROMPT = "PROMPT-SECRET-7f3a"


async def test_prompts_and_keys_never_logged(
    fake: FakeUpstream,
    client: openai.AsyncOpenAI,
    gateway: str,
    http: aiohttp.ClientSession,
    keys: TestKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    messages: Any = [{"role": "user", "content": SECRET_PROMPT}]
    fake.enqueue(
        Behaviour(echo=True),
        Behaviour(echo=True, cut_after=2),
        Behaviour(status=500),
        Behaviour(echo=True, error_after=1),
    )
    await client.chat.completions.create(model="gpt-test", messages=messages)
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        async for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-test", messages=messages)
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        async for _ in stream:
            pass
    # a body that fails to parse, with the prompt in it
    bad = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "' + SECRET_PROMPT.encode()
    headers = {"Authorization": f"Bearer {keys.team_a}", "Content-Type": "application/json"}
    async with http.post(gateway + "/v1/chat/completions", data=bad, headers=headers) as resp:
        assert resp.status == 400
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert SECRET_PROMPT not in logged
    assert "echo:" not in logged  # completions are not logged either
    for secret in (keys.team_a, keys.upstream):
        assert secret not in logged


async def test_upstream_address_not_disclosed(
    start_gateway: StartGateway, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    # the client must not learn where the providers live (internal hosts and ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = await start_gateway(providers={"up": {"api_base": f"http://127.0.0.1:{port}/v1"}})
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    async with http.post(url + CHAT, json=PAYLOAD, headers=headers) as resp:
        assert resp.status == 502
        body = await resp.text()
    assert str(port) not in body, body
    assert "127.0.0.1" not in body, body
