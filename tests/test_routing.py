"""Issue 4: the router under faults — retries and backoff, retry-after, breakers, fallbacks, streams
before/after their first chunk, balancing strategies, deadlines, concurrency caps, provider quotas.

Every deployment has its own FakeUpstream (providers `pa`..`pd` point at `fakes[0..3]`), so the
fakes' request logs tell the deployments apart. A deployment is named `<provider>/<model>`.
Weights of 1000 vs 0.001 make the first pick deterministic in practice (p = 1e-6).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import (
    USER_MESSAGES,
    AdminClient,
    StartRouted,
    assert_error_shape,
    metric_value,
    metrics_text,
    routing,
    sse_data_lines,
)

from gateway.routing import router as router_module
from gateway.testing.fake_upstream import DEFAULT_REPLY, Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CHAT = "/v1/chat/completions"
HEAVY = 1000.0
LIGHT = 0.001


# ---- config and fixtures (`fakes` and `start_routed` are in conftest.py) ------------------------


def dep(provider: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"provider": provider, "model": model, **extra}


def model(*deployments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"price": {"free": True}, "deployments": list(deployments), **extra}


@pytest.fixture
async def sdk(keys: TestKeys) -> AsyncIterator[Callable[[str], openai.AsyncOpenAI]]:
    made: list[openai.AsyncOpenAI] = []

    def make(url: str, key: str | None = None) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key or keys.team_a, max_retries=0, timeout=15.0)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def deployment(self) -> str | None:
        return self.headers.get("x-tollway-deployment")

    @property
    def attempts(self) -> str | None:
        return self.headers.get("x-tollway-attempts")


async def post_chat(
    http: aiohttp.ClientSession, url: str, key: str, model_name: str, *, stream: bool = False, **extra: Any
) -> Answer:
    """One raw chat request: status, lower-cased headers, the whole body, wall time."""
    body = {"model": model_name, "messages": USER_MESSAGES, "max_tokens": 16, **extra}
    if stream:
        body["stream"] = True
    t0 = time.monotonic()
    async with http.post(url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        raw = await resp.read()
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return Answer(resp.status, headers, raw, time.monotonic() - t0)


def gaps(fake: FakeUpstream) -> list[float]:
    t = [r.arrived_at for r in fake.requests]
    return [b - a for a, b in itertools.pairwise(t)]


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ready_breakers(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/ready") as resp:
        data = orjson.loads(await resp.read())
    assert isinstance(data.get("breakers"), dict), data
    out: dict[str, Any] = data["breakers"]
    return out


async def breaker_state(http: aiohttp.ClientSession, url: str, name: str) -> tuple[str, float]:
    """(state in /ready, tollway_breaker_state in /metrics) of one deployment."""
    b = await ready_breakers(http, url)
    assert name in b, b
    text = await metrics_text(http, url)
    return str(b[name]["state"]), metric_value(text, "tollway_breaker_state", deployment=name)


def stream_text(raw: bytes) -> tuple[str, list[Any], bool]:
    """(concatenated content, parsed data events, saw [DONE]) of an SSE body."""
    events: list[Any] = []
    done = False
    for d in sse_data_lines(raw):
        if d == b"[DONE]":
            done = True
            continue
        events.append(orjson.loads(d))
    text = "".join(
        (c.get("delta") or {}).get("content") or ""
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices") or []
    )
    return text, events, done


# ---- 1. retries with jittered backoff ------------------------------------------------------------


async def test_503_twice_then_200_is_retried_with_jittered_backoff(
    fakes: list[FakeUpstream], start_routed: StartRouted, sdk: Callable[[str], openai.AsyncOpenAI],
    http: aiohttp.ClientSession,
) -> None:
    backoff_max = 0.15
    url = await start_routed(
        {"solo": model(dep("pa", "solo-a"))},
        routing_cfg=routing({"backoff_base_s": 0.1, "backoff_max_s": backoff_max}),
    )
    fa = fakes[0]
    client = sdk(url)
    all_gaps: list[float] = []
    rounds = 4
    for _ in range(rounds):
        fa.requests.clear()
        fa.enqueue(Behaviour(status=503), times=2)
        raw = await client.chat.completions.with_raw_response.create(
            model="solo", messages=USER_MESSAGES, max_tokens=16
        )
        assert raw.status_code == 200
        assert raw.parse().choices[0].message.content == DEFAULT_REPLY
        assert raw.headers["x-tollway-attempts"] == "3"
        assert raw.headers["x-tollway-deployment"] == "pa/solo-a"
        assert raw.headers["x-tollway-provider"] == "pa"
        assert "x-tollway-fallback" not in raw.headers
        assert [r.status for r in fa.requests] == [503, 503, 200]
        all_gaps += gaps(fa)
    assert len(all_gaps) == 2 * rounds
    # Each wait is a full-jitter backoff: positive, capped (plus a little for the round trip)...
    assert all(0 < g < backoff_max + 0.1 for g in all_gaps), all_gaps
    # ...really waited (8 waits with no backoff would add up to a few ms)...
    assert sum(all_gaps) > 0.1, all_gaps
    # ...and random, not a fixed delay.
    assert max(all_gaps) - min(all_gaps) > 0.01, all_gaps
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_upstream_attempts_total", deployment="pa/solo-a",
                        outcome="server_error") == 2 * rounds
    assert metric_value(text, "tollway_upstream_attempts_total", deployment="pa/solo-a",
                        outcome="success") == rounds


async def test_timeout_is_retried_on_another_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """A per-deployment read timeout is a retryable failure."""
    url = await start_routed({
        "duo": model(
            dep("pa", "slow-a", weight=HEAVY, timeouts={"connect_s": 1.0, "read_s": 0.3, "total_s": 5.0}),
            dep("pb", "fast-b", weight=LIGHT),
        )
    })
    fakes[0].default = Behaviour(delay_s=3.0)
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 200, a.body
    assert a.deployment == "pb/fast-b" and a.attempts == "2"
    assert a.elapsed < 2.0
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_upstream_attempts_total", deployment="pa/slow-a",
                        outcome="timeout") == 1


# ---- 2. retry-after ---------------------------------------------------------------------------------


async def test_429_retry_after_is_honoured_without_a_storm(
    fakes: list[FakeUpstream], start_routed: StartRouted, sdk: Callable[[str], openai.AsyncOpenAI]
) -> None:
    url = await start_routed({"solo": model(dep("pa", "solo-a"))})
    fa = fakes[0]
    fa.enqueue(Behaviour(status=429, headers={"retry-after": "1"}))
    raw = await sdk(url).chat.completions.with_raw_response.create(
        model="solo", messages=USER_MESSAGES, max_tokens=16
    )
    assert raw.status_code == 200
    assert raw.headers["x-tollway-attempts"] == "2"
    assert len(fa.requests) == 2
    assert 0.95 <= gaps(fa)[0] < 1.6, gaps(fa)


async def test_429_retry_after_ms_is_honoured(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({"solo": model(dep("pa", "solo-a"))})
    fa = fakes[0]
    fa.enqueue(Behaviour(status=429, headers={"retry-after-ms": "400"}))
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 200 and a.attempts == "2"
    assert len(fa.requests) == 2
    assert 0.38 <= gaps(fa)[0] < 1.0, gaps(fa)


async def test_long_retry_after_fails_over_at_once(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {"duo": model(dep("pa", "busy-a", weight=HEAVY), dep("pb", "free-b", weight=LIGHT))}
    )
    fakes[0].enqueue(Behaviour(status=429, headers={"retry-after": "30"}))
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 200, a.body
    assert a.deployment == "pb/free-b" and a.attempts == "2"
    assert a.elapsed < 0.8  # no wait for the 30 s, nor for a backoff up to max_retry_after_s
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1


async def test_long_retry_after_on_the_only_deployment_passes_the_429_through(
    fakes: list[FakeUpstream], start_routed: StartRouted, sdk: Callable[[str], openai.AsyncOpenAI]
) -> None:
    url = await start_routed({"solo": model(dep("pa", "solo-a"))})
    fakes[0].enqueue(Behaviour(status=429, headers={"retry-after": "30"}))
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as ei:
        await sdk(url).chat.completions.create(model="solo", messages=USER_MESSAGES, max_tokens=16)
    assert time.monotonic() - t0 < 0.8
    assert ei.value.response.headers["retry-after"] == "30"
    assert ei.value.response.headers["x-tollway-attempts"] == "1"
    assert len(fakes[0].requests) == 1


# ---- 3. client errors are not retried ---------------------------------------------------------------


async def test_400_is_not_retried_nor_failed_over(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({
        "duo": model(
            dep("pa", "a", weight=HEAVY), dep("pb", "b", weight=LIGHT), fallbacks=[{"model": "other"}]
        ),
        "other": model(dep("pc", "c")),
    })
    err = {"error": {"message": "bad temperature (fake)", "type": "invalid_request_error",
                     "param": "temperature", "code": "invalid_value"}}
    fakes[0].enqueue(Behaviour(status=400, body=err))
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 400
    assert a.json() == err
    assert [len(f.requests) for f in fakes[:3]] == [1, 0, 0]
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_upstream_attempts_total", deployment="pa/a",
                        outcome="client_error") == 1
    # A client error is an answer: the deployment stays healthy.
    assert (await ready_breakers(http, url))["pa/a"]["failures"] == 0


async def test_upstream_401_fails_over_to_another_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """An upstream 401 (the gateway's credentials for that provider) becomes a 502
    `upstream_auth_failed`; another deployment (other provider, other credentials) may answer."""
    url = await start_routed({"duo": model(dep("pa", "a", weight=HEAVY), dep("pb", "b", weight=LIGHT))})
    fakes[0].enqueue(Behaviour(status=401))
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 200, a.body
    assert a.deployment == "pb/b" and a.attempts == "2"
    assert [len(f.requests) for f in fakes[:2]] == [1, 1]


async def test_upstream_401_is_not_retried_on_the_same_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """Issue 4: never retry on 401 — the same credentials will not work a moment later."""
    url = await start_routed({"solo": model(dep("pa", "solo-a"))})
    fakes[0].default = Behaviour(status=401)
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 502
    assert assert_error_shape(a.body)["code"] == "upstream_auth_failed"
    assert len(fakes[0].requests) == 1


# ---- 4. circuit breakers ----------------------------------------------------------------------------


async def test_breaker_opens_rejects_then_probes_once(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    open_s = 0.8
    url = await start_routed(
        {"duo": model(dep("pa", "sick-a", weight=HEAVY), dep("pb", "good-b", weight=LIGHT))},
        routing_cfg=routing(breaker={"consecutive_failures": 2, "open_s": open_s}),
    )
    fa, fb = fakes[0], fakes[1]
    fa.default = Behaviour(status=500)
    sick = "pa/sick-a"

    async def ask(n: int) -> list[Answer]:
        answers = await asyncio.gather(*(post_chat(http, url, keys.team_a, "duo") for _ in range(n)))
        assert [a.status for a in answers] == [200] * n, [a.body for a in answers]
        return answers

    # Two failures in a row open the breaker; the client never notices.
    for _ in range(2):
        (a,) = await ask(1)
        assert a.deployment == "pb/good-b" and a.attempts == "2"
    opened_at = time.monotonic()
    assert len(fa.requests) == 2
    assert await breaker_state(http, url, sick) == ("open", 2.0)
    assert (await breaker_state(http, url, "pb/good-b"))[0] == "closed"

    # Open: nothing goes to it.
    answers = await ask(5)
    assert all(a.deployment == "pb/good-b" and a.attempts == "1" for a in answers)
    assert len(fa.requests) == 2
    assert time.monotonic() - opened_at < open_s, "too slow to check the open state"

    # Half open: exactly one probe among concurrent requests; it fails and re-opens the breaker.
    fa.default = Behaviour(status=500, delay_s=0.3)
    await asyncio.sleep(open_s + 0.1 - (time.monotonic() - opened_at))
    answers = await ask(5)
    assert len(fa.requests) == 3
    assert sorted(a.attempts or "" for a in answers) == ["1", "1", "1", "1", "2"]
    reopened_at = time.monotonic()
    assert await breaker_state(http, url, sick) == ("open", 2.0)
    await ask(3)
    assert len(fa.requests) == 3

    # The deployment comes back: the next probe succeeds and closes the breaker.
    fa.default = Behaviour()
    await asyncio.sleep(open_s + 0.1 - (time.monotonic() - reopened_at))
    (a,) = await ask(1)
    assert a.deployment == sick and a.attempts == "1"
    assert len(fa.requests) == 4
    assert await breaker_state(http, url, sick) == ("closed", 0.0)
    answers = await ask(3)
    assert all(a.deployment == sick for a in answers)
    assert len(fa.requests) == 7
    assert len(fb.requests) == 2 + 5 + 5 + 3  # every failure and every rejection landed on pb


async def test_breaker_opens_on_a_dead_port(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {"duo": model(dep("dead", "gone", weight=HEAVY), dep("pb", "good-b", weight=LIGHT))},
        routing_cfg=routing(breaker={"consecutive_failures": 2, "open_s": 30.0}),
        providers={"dead": {"kind": "openai_compatible", "api_base": f"http://127.0.0.1:{closed_port()}/v1",
                            "api_key": "${TOLLWAY_TEST_UPSTREAM_KEY}"}},
    )
    answers = [await post_chat(http, url, keys.team_a, "duo") for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    assert [a.attempts for a in answers] == ["2", "2", "1", "1", "1"]
    assert await breaker_state(http, url, "dead/gone") == ("open", 2.0)
    b = (await ready_breakers(http, url))["dead/gone"]
    assert b["retry_in_s"] is not None and 25 < b["retry_in_s"] <= 30
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_upstream_attempts_total", deployment="dead/gone",
                        outcome="unavailable") == 2
    assert len(fakes[1].requests) == 5


# ---- 5. fallbacks -----------------------------------------------------------------------------------


async def test_all_deployments_failing_fall_back_with_default_budget(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """Both deployments of `primary` answer 503 (breakers closed, default max_attempts 3): once each
    has failed, the fallback gets its turn instead of the budget going to a second round."""
    url = await start_routed(
        {
            "primary": model(dep("pa", "p-a"), dep("pb", "p-b"), fallbacks=[{"model": "backup"}]),
            "backup": model(dep("pc", "b-c")),
        },
        # The production defaults (max_attempts 3, breakers at 5 failures) but short backoffs.
        routing_cfg={"retry": {"max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.1}},
    )
    fakes[0].default = fakes[1].default = Behaviour(status=503)
    a = await post_chat(http, url, keys.team_a, "primary")
    assert a.status == 200, a.body
    assert a.headers.get("x-tollway-fallback") == "backup"
    assert a.deployment == "pc/b-c"
    assert len(fakes[2].requests) == 1
    assert len(fakes[0].requests) >= 1 and len(fakes[1].requests) >= 1


async def test_fallback_answers_with_headers_and_metrics(
    fakes: list[FakeUpstream], start_routed: StartRouted, sdk: Callable[[str], openai.AsyncOpenAI],
    http: aiohttp.ClientSession,
) -> None:
    url = await start_routed({
        "primary": model(dep("pa", "p-a"), fallbacks=[{"model": "backup"}]),
        "backup": model(dep("pc", "b-c")),
    })
    fakes[0].default = Behaviour(status=429, headers={"retry-after": "30"})
    fakes[2].default = Behaviour(content="from the backup")
    client = sdk(url)
    for i in (1, 2):
        raw = await client.chat.completions.with_raw_response.create(
            model="primary", messages=USER_MESSAGES, max_tokens=16
        )
        assert raw.parse().choices[0].message.content == "from the backup"
        assert raw.headers["x-tollway-fallback"] == "backup"
        assert raw.headers["x-tollway-provider"] == "pc"
        assert raw.headers["x-tollway-deployment"] == "pc/b-c"
        # The second request: pa cools down after its 429 (retry-after, capped at
        # max_retry_after_s), so it goes to the fallback without asking pa again.
        assert raw.headers["x-tollway-attempts"] == ("2" if i == 1 else "1")
        text = await metrics_text(http, url)
        assert metric_value(text, "tollway_fallbacks_total", model="primary", fallback="backup") == i
    assert len(fakes[0].requests) == 1 and len(fakes[2].requests) == 2
    assert fakes[2].requests[0].body["model"] == "b-c"


async def test_open_breaker_goes_straight_to_the_fallback(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {
            "primary": model(dep("pa", "p-a"), fallbacks=[{"model": "backup"}]),
            "backup": model(dep("pc", "b-c")),
        },
        routing_cfg=routing(breaker={"consecutive_failures": 1, "open_s": 30.0}),
    )
    fakes[0].default = Behaviour(status=503)
    first = await post_chat(http, url, keys.team_a, "primary")
    assert first.status == 200 and first.headers.get("x-tollway-fallback") == "backup"
    assert len(fakes[0].requests) == 1
    second = await post_chat(http, url, keys.team_a, "primary")
    assert second.status == 200 and second.headers.get("x-tollway-fallback") == "backup"
    assert second.attempts == "1"
    assert len(fakes[0].requests) == 1  # the open breaker kept it away from pa
    assert len(fakes[2].requests) == 2


async def test_context_length_fallback_only_for_context_length(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {
            "small": model(dep("pa", "small-a"), fallbacks=[{"model": "large", "on": ["context_length"]}]),
            "large": model(dep("pb", "large-b")),
        },
        routing_cfg=routing({"max_attempts": 2}),
    )
    fa, fb = fakes[0], fakes[1]
    too_long = {"error": {
        "message": "This model's maximum context length is 8192 tokens. However, your messages "
                   "resulted in 9000 tokens.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
    }}
    fa.enqueue(Behaviour(status=400, body=too_long))
    a = await post_chat(http, url, keys.team_a, "small")
    assert a.status == 200, a.body
    assert a.headers.get("x-tollway-fallback") == "large" and a.deployment == "pb/large-b"
    assert len(fa.requests) == 1 and len(fb.requests) == 1

    fa.enqueue(Behaviour(status=503), times=2)  # a 5xx: not a reason for this fallback
    a = await post_chat(http, url, keys.team_a, "small")
    assert a.status == 503, a.body
    assert "x-tollway-fallback" not in a.headers
    assert len(fa.requests) == 3 and len(fb.requests) == 1

    fa.enqueue(Behaviour(status=400))  # another 400: not a context-length error
    a = await post_chat(http, url, keys.team_a, "small")
    assert a.status == 400
    assert len(fa.requests) == 4 and len(fb.requests) == 1
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_fallbacks_total", model="small", fallback="large") == 1


async def test_fallback_outside_the_keys_allowed_models_is_skipped(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({
        "fb-primary": model(dep("pa", "p-a"), fallbacks=[{"model": "fb-forbidden"}, {"model": "fb-allowed"}]),
        "fb-forbidden": model(dep("pb", "f-b")),
        "fb-allowed": model(dep("pc", "a-c")),
    })
    fakes[0].default = Behaviour(status=429, headers={"retry-after": "30"})
    admin = AdminClient(http, url, keys.admin)
    await admin.create_team(id="fb", name="fb")
    k = await admin.create_key(team_id="fb", name="narrow", allowed_models=["fb-primary", "fb-allowed"])

    # Control: an unrestricted key gets the first fallback in order.
    a = await post_chat(http, url, keys.team_a, "fb-primary")
    assert a.status == 200 and a.headers.get("x-tollway-fallback") == "fb-forbidden"
    assert [len(f.requests) for f in fakes[:3]] == [1, 1, 0]

    a = await post_chat(http, url, k["key"], "fb-primary")
    assert a.status == 200, a.body
    assert a.headers.get("x-tollway-fallback") == "fb-allowed"
    # pa is cooling down after its 429 (retry-after): not asked again.
    assert [len(f.requests) for f in fakes[:3]] == [1, 1, 1]


# ---- 6. streams -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [Behaviour(status=503), Behaviour(cut_after=0), Behaviour(hang_after=0), Behaviour(error_after=0)],
    ids=["503", "cut-before-first-event", "silent-before-first-event", "error-event-first"],
)
async def test_stream_failing_before_its_first_chunk_is_retried(
    fakes: list[FakeUpstream], start_routed: StartRouted, sdk: Callable[[str], openai.AsyncOpenAI],
    first: Behaviour,
) -> None:
    url = await start_routed(
        {"solo": model(dep("pa", "solo-a", timeouts={"connect_s": 1.0, "read_s": 0.4, "total_s": 5.0}))}
    )
    fa = fakes[0]
    fa.enqueue(first)
    raw = await sdk(url).chat.completions.with_raw_response.create(
        model="solo", messages=USER_MESSAGES, max_tokens=16, stream=True
    )
    assert raw.headers["x-tollway-attempts"] == "2"
    text = ""
    async for chunk in raw.parse():
        for c in chunk.choices:
            text += c.delta.content or ""
    assert text == DEFAULT_REPLY
    assert len(fa.requests) == 2
    assert fa.requests[1].done_sent


async def test_stream_falls_back_before_its_first_chunk(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({
        "primary": model(dep("pa", "p-a"), fallbacks=[{"model": "backup"}]),
        "backup": model(dep("pc", "b-c")),
    })
    fakes[0].default = Behaviour(status=429, headers={"retry-after": "30"})
    fakes[2].default = Behaviour(content="streamed by the backup", stream_chunks=3)
    a = await post_chat(http, url, keys.team_a, "primary", stream=True)
    assert a.status == 200
    assert a.headers.get("x-tollway-fallback") == "backup"
    text, events, done = stream_text(a.body)
    assert text == "streamed by the backup" and done
    assert not any("error" in e for e in events)


async def test_stream_cut_after_first_chunk_is_an_sse_error_without_retry_or_fallback(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({
        "duo": model(
            dep("pa", "a", weight=HEAVY), dep("pb", "b", weight=LIGHT), fallbacks=[{"model": "backup"}]
        ),
        "backup": model(dep("pc", "c")),
    })
    fakes[0].enqueue(Behaviour(stream_chunks=6, cut_after=2))
    a = await post_chat(http, url, keys.team_a, "duo", stream=True)
    assert a.status == 200
    assert a.deployment == "pa/a" and a.attempts == "1"
    text, events, done = stream_text(a.body)
    assert not done
    assert text  # the first chunks reached the client
    assert isinstance(events[-1], dict) and "error" in events[-1], events[-1]
    assert sum(1 for e in events if "error" in e) == 1
    assert [len(f.requests) for f in fakes[:3]] == [1, 0, 0]
    text_m = await metrics_text(http, url)
    assert metric_value(text_m, "tollway_upstream_attempts_total", deployment="pa/a",
                        outcome="stream_broken") == 1
    assert metric_value(text_m, "tollway_fallbacks_total") == 0


# ---- 7. balancing strategies ------------------------------------------------------------------------


async def test_least_inflight_prefers_the_idle_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {"lb": model(dep("pa", "slow-a"), dep("pb", "fast-b"), strategy="least_inflight")}
    )
    fakes[0].default = Behaviour(delay_s=1.0)
    fakes[1].default = Behaviour(delay_s=0.01)
    total = 24
    remaining = [total]

    async def worker() -> list[Answer]:
        out = []
        while remaining[0] > 0:
            remaining[0] -= 1
            out.append(await post_chat(http, url, keys.team_a, "lb"))
        return out

    results = [a for batch in await asyncio.gather(*(worker() for _ in range(4))) for a in batch]
    assert len(results) == total and all(a.status == 200 for a in results)
    # The first 4 spread 2/2 (ties); after that the slow one is busy and the idle one takes all.
    assert len(fakes[0].requests) <= 3, len(fakes[0].requests)
    assert len(fakes[1].requests) >= total - 3


async def test_lowest_latency_converges_on_the_faster_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = await start_routed(
        {"lb": model(dep("pa", "slow-a"), dep("pb", "fast-b"), strategy="lowest_latency")}
    )
    fakes[0].default = Behaviour(delay_s=0.25)
    fakes[1].default = Behaviour(delay_s=0.01)
    # Without exploration (by default ~5% of requests measure another deployment again, see
    # tests/test_routing_gaps.py) the choice is deterministic once each deployment was measured.
    monkeypatch.setattr(router_module, "LATENCY_EXPLORE", 0.0)
    answers = [await post_chat(http, url, keys.team_a, "lb") for _ in range(12)]
    assert all(a.status == 200 for a in answers)
    # Warm-up explores each deployment once, then the faster one gets everything.
    assert {a.deployment for a in answers[:2]} == {"pa/slow-a", "pb/fast-b"}
    assert [a.deployment for a in answers[2:]] == ["pb/fast-b"] * 10
    assert len(fakes[0].requests) == 1


async def test_weighted_follows_the_weights(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({"lb": model(dep("pa", "a", weight=3), dep("pb", "b", weight=1))})
    n = 160
    for _ in range(n // 20):
        answers = await asyncio.gather(*(post_chat(http, url, keys.team_a, "lb") for _ in range(20)))
        assert all(a.status == 200 for a in answers)
    share = len(fakes[0].requests) / n
    assert len(fakes[0].requests) + len(fakes[1].requests) == n
    assert 0.6 <= share <= 0.9, share  # expected 0.75, sd 0.034


# ---- 8. deadline and attempt budget -----------------------------------------------------------------


async def test_deadline_bounds_retries_of_a_failing_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    deadline = 1.0
    url = await start_routed(
        {"solo": model(dep("pa", "solo-a"))},
        routing_cfg=routing({"max_attempts": 20, "deadline_s": deadline}),
    )
    fakes[0].default = Behaviour(status=503, delay_s=0.15)
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 503
    assert a.elapsed < deadline + 0.4, a.elapsed
    n = len(fakes[0].requests)
    assert 3 <= n <= deadline / 0.15 + 1, n
    assert a.attempts == str(n)


async def test_deadline_bounds_an_attempt_in_progress(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """The deadline is the overall time for all attempts: an upstream that is slower than the
    deadline (but within its own read timeout) does not keep the client waiting past it."""
    deadline = 0.8
    url = await start_routed(
        {"solo": model(dep("pa", "solo-a"))},
        routing_cfg=routing({"deadline_s": deadline}),
    )
    fakes[0].default = Behaviour(delay_s=2.5)
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.elapsed < deadline + 0.5, (a.status, a.elapsed)
    assert a.status >= 500
    assert_error_shape(a.body)


async def test_max_attempts_bounds_upstream_requests(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {
            "duo": model(dep("pa", "a"), dep("pb", "b"), fallbacks=[{"model": "backup"}]),
            "backup": model(dep("pc", "c")),
        },
        routing_cfg=routing({"max_attempts": 3}),
    )
    for f in fakes:
        f.default = Behaviour(status=503)
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status >= 500 and a.attempts == "3"
    assert sum(len(f.requests) for f in fakes[:3]) == 3

    url2 = await start_routed({"solo": model(dep("pd", "d"))}, routing_cfg=routing({"max_attempts": 2}))
    a = await post_chat(http, url2, keys.team_a, "solo")
    assert a.status == 503 and a.attempts == "2"
    assert len(fakes[3].requests) == 2


# ---- 9. per-deployment concurrency ------------------------------------------------------------------


async def test_max_concurrency_spills_to_the_other_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {"duo": model(dep("pa", "a", weight=HEAVY, max_concurrency=1), dep("pb", "b", weight=LIGHT))}
    )
    fakes[0].default = Behaviour(delay_s=0.4)
    answers = await asyncio.gather(*(post_chat(http, url, keys.team_a, "duo") for _ in range(4)))
    assert [a.status for a in answers] == [200] * 4
    assert sorted(a.deployment or "" for a in answers) == ["pa/a", "pb/b", "pb/b", "pb/b"]
    assert all(a.attempts == "1" for a in answers)
    assert [len(f.requests) for f in fakes[:2]] == [1, 3]
    a = await post_chat(http, url, keys.team_a, "duo")  # free again
    assert a.deployment == "pa/a"


# ---- 10. provider-wide quota ------------------------------------------------------------------------


async def test_provider_quota_sends_the_overflow_to_another_provider(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed(
        {"duo": model(dep("pa", "a", weight=HEAVY), dep("pb", "b", weight=LIGHT))},
        providers={"pa": {"rpm": 2, "max_queue_s": 0}},
    )
    answers = [await post_chat(http, url, keys.team_a, "duo") for _ in range(3)]
    assert [a.status for a in answers] == [200] * 3, [a.body for a in answers]
    assert [a.deployment for a in answers] == ["pa/a", "pa/a", "pb/b"]
    assert answers[2].elapsed < 1.0
    assert [len(f.requests) for f in fakes[:2]] == [2, 1]


async def test_provider_quota_with_a_single_provider_is_a_429(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({"solo": model(dep("pa", "a"))}, providers={"pa": {"rpm": 2, "max_queue_s": 0}})
    for _ in range(2):
        a = await post_chat(http, url, keys.team_a, "solo")
        assert a.status == 200, a.body
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 429, a.body
    assert assert_error_shape(a.body)["code"] == "provider_quota_exceeded"
    ra = a.headers.get("retry-after")
    # The 60 s window slides (the previous window counts pro rata): up to ~2 minutes.
    assert ra is not None and 1 <= int(ra) <= 120, ra
    assert a.elapsed < 1.0
    assert len(fakes[0].requests) == 2
