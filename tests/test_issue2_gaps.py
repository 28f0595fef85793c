"""Issue 2 behaviours no other test file pins: un-prefixed paths, stream headers, custom provider
auth, mock pacing, metric series, the overhead header and x-request-id on every response."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest
from helpers import USER_MESSAGES, StartGateway, assert_error_shape, metric_value, metrics_text

from gateway.testing.fake_upstream import DEFAULT_REPLY, Behaviour, FakeUpstream, embedding_for
from gateway.testing.harness import TestKeys, gateway_config, running_gateway

CHAT_BODY: dict[str, Any] = {"model": "gpt-test", "messages": USER_MESSAGES}


def overhead_ms(headers: Any) -> float:
    value = headers.get("x-tollway-overhead-ms")
    assert value is not None, dict(headers)
    ms = float(value)
    assert ms >= 0.0, value
    return ms


# ---- a. the OpenAI routes without the /v1 prefix ------------------------------------------------


async def test_sdk_without_v1_prefix(fake: FakeUpstream, gateway: str, keys: TestKeys) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key=keys.team_a, max_retries=0) as c:
        chat = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
        assert chat.choices[0].message.content == DEFAULT_REPLY
        assert fake.last.path == "/v1/chat/completions"
        assert fake.last.body["model"] == "upstream-chat-1"

        comp = await c.completions.create(model="instruct-test", prompt="Say hello")
        assert comp.choices[0].text
        assert fake.last.path == "/v1/completions"
        assert fake.last.body["model"] == "upstream-instruct-1"

        emb = await c.embeddings.create(model="embed-test", input="hi", encoding_format="float")
        assert emb.data[0].embedding == embedding_for("hi", "upstream-embed-1")
        assert fake.last.path == "/v1/embeddings"

        n_upstream = len(fake.requests)
        models = await c.models.list()
        assert "gpt-test" in {m.id for m in models.data}
        m = await c.models.retrieve("gpt-test")
        assert m.id == "gpt-test"
        assert len(fake.requests) == n_upstream  # models are answered by the gateway itself


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/chat/completions", CHAT_BODY),
        ("POST", "/completions", {"model": "instruct-test", "prompt": "hi"}),
        ("POST", "/embeddings", {"model": "embed-test", "input": "hi"}),
        ("GET", "/models", None),
        ("GET", "/models/gpt-test", None),
    ],
)
async def test_raw_paths_without_v1_prefix(
    fake: FakeUpstream,
    gateway: str,
    http: aiohttp.ClientSession,
    auth: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    async with http.request(method, gateway + path, json=body, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    assert data["object"] in {"chat.completion", "text_completion", "list", "model"}, data
    if method == "POST":
        assert fake.last.path == "/v1" + path


# ---- b. streams are not buffered by proxies -------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-test", "mock-chat"])
async def test_stream_carries_x_accel_buffering_no(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], model: str
) -> None:
    body = {"model": model, "messages": USER_MESSAGES, "stream": True}
    async with http.post(gateway + "/v1/chat/completions", json=body, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
        assert resp.headers.get("X-Accel-Buffering") == "no"
        assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert raw.rstrip().endswith(b"data: [DONE]")


# ---- c. openai_compatible with its own auth header and extra headers ---------------------------


async def _auth_header_case(fake: FakeUpstream, keys: TestKeys, scheme: str | None) -> None:
    config = gateway_config(fake.base_url)
    up = config["providers"]["up"]
    up["auth_header"] = "x-api-key"
    up["auth_scheme"] = scheme  # set here, not via deep_merge: a None override deletes the key
    up["headers"] = {"X-Extra-Static": "static-value", "X-Extra-Env": "${TOLLWAY_TEST_KEY_B}"}
    async with running_gateway(config) as url:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
            r = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
            assert r.choices[0].message.content == DEFAULT_REPLY
            stream = await c.chat.completions.create(
                model="gpt-test", messages=USER_MESSAGES, stream=True
            )
            async for _ in stream:
                pass
    assert len(fake.requests) == 2
    for rec in fake.requests:
        h = rec.headers
        assert h.get("x-api-key") == keys.upstream, dict(h)  # bare key, no "Bearer "
        assert "Authorization" not in h, dict(h)  # neither the provider's key nor the client's
        assert keys.team_a not in str(dict(h))
        assert h.get("X-Extra-Static") == "static-value"
        assert h.get("X-Extra-Env") == keys.team_b  # ${ENV} resolved in header values


async def test_custom_auth_header_null_scheme(fake: FakeUpstream, keys: TestKeys) -> None:
    await _auth_header_case(fake, keys, None)


async def test_custom_auth_header_empty_scheme(fake: FakeUpstream, keys: TestKeys) -> None:
    await _auth_header_case(fake, keys, "")


async def test_custom_auth_header_with_scheme(fake: FakeUpstream, keys: TestKeys) -> None:
    config = gateway_config(fake.base_url)
    config["providers"]["up"].update(auth_header="X-Custom-Auth", auth_scheme="Token")
    async with running_gateway(config) as url:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
            await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    h = fake.last.headers
    assert h.get("X-Custom-Auth") == f"Token {keys.upstream}"
    assert "Authorization" not in h


# ---- d. mock provider pacing ---------------------------------------------------------------------


async def _first_and_total(
    url: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> tuple[float, float]:
    """(seconds to the first SSE data event, seconds to the end) of one streamed mock-chat request."""
    body = {"model": "mock-chat", "messages": USER_MESSAGES, "stream": True}
    t0 = time.perf_counter()
    first: float | None = None
    async with http.post(url + "/v1/chat/completions", json=body, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if first is None and line.startswith(b"data:"):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert first is not None
    return first, total


async def test_mock_time_to_first_token(
    start_gateway: StartGateway, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    url = await start_gateway(providers={"mock": {"mock": {"ttft_ms": 200}}})
    first, _ = await _first_and_total(url, http, auth)
    assert first >= 0.18, first
    t0 = time.perf_counter()
    async with http.post(
        url + "/v1/chat/completions", json={**CHAT_BODY, "model": "mock-chat"}, headers=auth
    ) as resp:
        assert resp.status == 200
        await resp.read()
    assert time.perf_counter() - t0 >= 0.18


async def test_mock_tokens_per_second(
    start_gateway: StartGateway, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    url = await start_gateway(providers={"mock": {"mock": {"tokens_per_s": 50, "reply_tokens": 10}}})
    _, total = await _first_and_total(url, http, auth)
    assert total >= 0.15, total  # 10 tokens at 50/s: 0.2 s
    t0 = time.perf_counter()
    async with http.post(
        url + "/v1/chat/completions", json={**CHAT_BODY, "model": "mock-chat"}, headers=auth
    ) as resp:
        data = await resp.json()
    assert time.perf_counter() - t0 >= 0.15
    assert data["usage"]["completion_tokens"] == 10


async def test_mock_fast_by_default(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    # the control for the two tests above: without pacing the same stream is quick
    first, total = await _first_and_total(gateway, http, auth)
    assert total < 2.0, total
    assert first <= total


# ---- e. the metric series ------------------------------------------------------------------------


async def test_metrics_series_after_a_request(
    fake: FakeUpstream, gateway: str, client: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    r = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert r.usage is not None
    text = await metrics_text(http, gateway)
    assert metric_value(text, "tollway_requests_total", model="gpt-test", status="200") == 1
    assert metric_value(
        text, "tollway_request_duration_seconds_count", endpoint="chat", model="gpt-test", status="200"
    ) == 1
    assert metric_value(
        text, "tollway_request_duration_seconds_sum", endpoint="chat", model="gpt-test", status="200"
    ) > 0
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=USER_MESSAGES)
    text = await metrics_text(http, gateway)
    # latency by status too: the 404 is its own series, the 200's count is unchanged
    assert metric_value(
        text, "tollway_request_duration_seconds_count", endpoint="chat", status="404"
    ) == 1
    assert metric_value(
        text, "tollway_request_duration_seconds_count", endpoint="chat", status="200"
    ) == 1
    assert metric_value(text, "tollway_upstream_duration_seconds_count", provider="up") == 1
    assert metric_value(text, "tollway_upstream_duration_seconds_sum", provider="up") > 0
    assert metric_value(text, "tollway_gateway_overhead_seconds_count", endpoint="chat") == 1
    assert metric_value(text, "tollway_gateway_overhead_seconds_sum", endpoint="chat") > 0
    assert metric_value(
        text, "tollway_tokens_total", model="gpt-test", kind="prompt"
    ) == r.usage.prompt_tokens > 0
    assert metric_value(
        text, "tollway_tokens_total", model="gpt-test", kind="completion"
    ) == r.usage.completion_tokens > 0


# ---- f. x-tollway-overhead-ms excludes the upstream's time ---------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_overhead_header_excludes_upstream_time(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], stream: bool
) -> None:
    fake.enqueue(Behaviour(delay_s=0.5, stream_chunks=3 if stream else None))
    t0 = time.perf_counter()
    async with http.post(
        gateway + "/v1/chat/completions", json={**CHAT_BODY, "stream": stream}, headers=auth
    ) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        ms = overhead_ms(resp.headers)
    took = time.perf_counter() - t0
    assert took >= 0.5, took
    assert ms < 100, ms


async def test_overhead_header_excludes_upstream_time_on_upstream_error(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(delay_s=0.5, status=500))
    t0 = time.perf_counter()
    async with http.post(gateway + "/v1/chat/completions", json=CHAT_BODY, headers=auth) as resp:
        assert resp.status == 500
        assert_error_shape(await resp.read())
        ms = overhead_ms(resp.headers)
        assert resp.headers.get("x-request-id")
    assert time.perf_counter() - t0 >= 0.5
    assert ms < 100, ms


# ---- g. the generated x-request-id goes upstream ---------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_generated_request_id_forwarded_upstream(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], stream: bool
) -> None:
    assert "x-request-id" not in {k.lower() for k in auth}
    async with http.post(
        gateway + "/v1/chat/completions", json={**CHAT_BODY, "stream": stream}, headers=auth
    ) as resp:
        assert resp.status == 200
        await resp.read()
        rid = resp.headers.get("x-request-id")
    assert rid and rid.startswith("req_"), rid
    assert fake.last.headers.get("x-request-id") == rid


async def test_generated_request_ids_are_unique(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    seen = set()
    for _ in range(3):
        async with http.post(gateway + "/v1/chat/completions", json=CHAT_BODY, headers=auth) as resp:
            seen.add(resp.headers["x-request-id"])
    assert len(seen) == 3
    assert {r.headers["x-request-id"] for r in fake.requests} == seen


async def test_client_request_id_forwarded_upstream(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    headers = {**auth, "x-request-id": "client-chosen-id-42"}
    async with http.post(gateway + "/v1/chat/completions", json=CHAT_BODY, headers=headers) as resp:
        assert resp.headers["x-request-id"] == "client-chosen-id-42"
    assert fake.last.headers.get("x-request-id") == "client-chosen-id-42"


# ---- h. every response carries x-request-id and x-tollway-overhead-ms ------------------------------


ERROR_CASES = [
    pytest.param("POST", "/v1/chat/completions", {"json": {**CHAT_BODY, "model": "nope"}}, 404, True,
                 id="unknown-model"),
    pytest.param("POST", "/v1/chat/completions", {"data": b"{not json",
                 "headers": {"Content-Type": "application/json"}}, 400, True, id="malformed-json"),
    pytest.param("POST", "/v1/chat/completions", {"json": {"messages": USER_MESSAGES}}, 400, True,
                 id="missing-model"),
    pytest.param("POST", "/v1/chat/completions", {"data": b"x", "headers": {"Content-Type": "text/plain"}},
                 415, True, id="wrong-content-type"),
    pytest.param("POST", "/v1/chat/completions", {"json": CHAT_BODY}, 401, False, id="no-key"),
    pytest.param("GET", "/v1/models/nope", {}, 404, True, id="unknown-model-get"),
    pytest.param("GET", "/v1/no-such-path", {}, 404, True, id="unknown-path"),
    pytest.param("DELETE", "/v1/chat/completions", {}, 405, True, id="wrong-method"),
]


@pytest.mark.parametrize(("method", "path", "kw", "status", "with_key"), ERROR_CASES)
@pytest.mark.parametrize("client_rid", [None, "client-rid-7"])
async def test_error_responses_carry_request_id_and_overhead(
    fake: FakeUpstream,
    gateway: str,
    http: aiohttp.ClientSession,
    auth: dict[str, str],
    method: str,
    path: str,
    kw: dict[str, Any],
    status: int,
    with_key: bool,
    client_rid: str | None,
) -> None:
    kw = dict(kw)  # the parameters are shared by the client_rid variants
    headers = {**(auth if with_key else {}), **kw.pop("headers", {})}
    if client_rid is not None:
        headers["x-request-id"] = client_rid
    async with http.request(method, gateway + path, headers=headers, **kw) as resp:
        assert resp.status == status, await resp.text()
        assert_error_shape(await resp.read())
        rid = resp.headers.get("x-request-id")
        ms = overhead_ms(resp.headers)
    assert rid and (rid == client_rid if client_rid else rid.startswith("req_")), rid
    assert ms < 1000, ms
    assert fake.requests == []


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/gpt-test", "/models", "/models/gpt-test"])
async def test_models_responses_carry_request_id_and_overhead(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str], path: str
) -> None:
    async with http.get(gateway + path, headers=auth) as resp:
        assert resp.status == 200
        await resp.read()
        assert (resp.headers.get("x-request-id") or "").startswith("req_")
        assert overhead_ms(resp.headers) < 1000
    async with http.get(gateway + path, headers={**auth, "x-request-id": "mine-1"}) as resp:
        assert resp.headers.get("x-request-id") == "mine-1"
        overhead_ms(resp.headers)


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
async def test_ops_responses_carry_request_id_and_overhead(
    gateway: str, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(gateway + path) as resp:
        assert resp.status == 200
        await resp.read()
        assert (resp.headers.get("x-request-id") or "").startswith("req_")
        overhead_ms(resp.headers)
    async with http.get(gateway + path, headers={"x-request-id": "ops-rid"}) as resp:
        assert resp.headers.get("x-request-id") == "ops-rid"


async def test_admin_response_carries_request_id_and_overhead(
    gateway: str, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    headers = {"Authorization": f"Bearer {keys.admin}"}
    async with http.get(gateway + "/admin/teams", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert (resp.headers.get("x-request-id") or "").startswith("req_")
        overhead_ms(resp.headers)


async def test_success_headers_not_duplicated(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    for path in ("/v1/models", "/v1/chat/completions"):
        body = CHAT_BODY if path.endswith("completions") else None
        method = "POST" if body else "GET"
        async with http.request(method, gateway + path, json=body, headers=auth) as resp:
            assert len(resp.headers.getall("x-request-id")) == 1
            assert len(resp.headers.getall("x-tollway-overhead-ms")) == 1
