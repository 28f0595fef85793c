"""Issue 4 audit gaps in the router: each test here failed before its fix.

Gateways run in-process against loopback fakes: FakeUpstream `pa`..`pd` (fakes[0..3]) and one
FakeAnthropic (`an`). Deployments are named `<provider>/<model>`. Weights 1000 vs 0.001 make the
first pick deterministic in practice (p = 1e-6). Timing assertions are lower bounds plus generous
upper bounds (a shared 2-core machine).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from helpers import (
    StartRouted,
    assert_error_shape,
    merge_providers,
    metric_value,
    metrics_text,
    provider_config,
    routing,
    sse_data_lines,
)
from test_routing import HEAVY, LIGHT, Answer, dep, model, post_chat, ready_breakers

import gateway.app
from gateway.routing import router as router_module
from gateway.settings import ConfigError, load_settings
from gateway.testing.fake_anthropic import AnthropicBehaviour, FakeAnthropic
from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CLAUDE = "claude-x"
"""The upstream model of the anthropic deployment `an/claude-x`."""


@pytest.fixture
async def anth() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def start_routed(anth: FakeAnthropic, start_routed: StartRouted) -> StartRouted:
    """conftest's `start_routed`, plus a provider `an` (kind anthropic) at the fake Anthropic
    (`providers` are merged over it as over pa..pd). `anth` comes first: it outlives the gateway."""

    async def start(models: dict[str, Any], *, providers: dict[str, Any] | None = None, **kw: Any) -> str:
        an = {"an": provider_config("anthropic", anth.url)}
        return await start_routed(models, providers=merge_providers(an, providers), **kw)

    return start


async def attempts_metric(http: aiohttp.ClientSession, url: str, deployment: str) -> dict[str, float]:
    """tollway_upstream_attempts_total of one deployment: outcome -> count (non-zero only)."""
    text = await metrics_text(http, url)
    out: dict[str, float] = {}
    for outcome in (
        "success", "stream_error", "stream_broken", "timeout", "rate_limit", "server_error",
        "client_error", "unavailable", "deadline",
    ):
        v = metric_value(text, "tollway_upstream_attempts_total", deployment=deployment, outcome=outcome)
        if v:
            out[outcome] = v
    return out


# ---- 1. an upstream 401/403 from Anthropic is not retried ------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_anthropic_auth_failure_is_attempted_once(
    anth: FakeAnthropic, start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys, status: int
) -> None:
    url = await start_routed({"claude": model(dep("an", CLAUDE))})  # 3 attempts allowed
    anth.default = AnthropicBehaviour(status=status)
    a = await post_chat(http, url, keys.team_a, "claude")
    assert a.status == 502, a.body
    assert assert_error_shape(a.body)["code"] == "upstream_auth_failed"
    assert a.attempts == "1"
    assert len(anth.requests) == 1


# ---- 2. a stream that fails after its first chunk is a failed attempt -------------------------------


@pytest.mark.parametrize(
    ("upstream", "behaviour", "outcome"),
    [
        ("openai", Behaviour(stream_chunks=6, error_after=3), "stream_error"),
        ("openai", Behaviour(stream_chunks=6, send_done=False), "stream_broken"),
        ("anthropic", AnthropicBehaviour(content="one two three four", error_after=4), "stream_error"),
        ("anthropic", AnthropicBehaviour(content="one two three four", omit_message_stop=True),
         "stream_broken"),
    ],
    ids=["openai-error-event", "openai-no-done", "anthropic-error-event", "anthropic-no-message-stop"],
)
async def test_stream_failing_after_its_first_chunk_is_a_failed_attempt(
    fakes: list[FakeUpstream], anth: FakeAnthropic, start_routed: StartRouted,
    http: aiohttp.ClientSession, keys: TestKeys, upstream: str, behaviour: Any, outcome: str,
) -> None:
    name = "pa/a" if upstream == "openai" else f"an/{CLAUDE}"
    url = await start_routed({"m": model(dep(*name.split("/")))})
    if upstream == "openai":
        fakes[0].enqueue(behaviour)
    else:
        anth.enqueue(behaviour)
    a = await post_chat(http, url, keys.team_a, "m", stream=True)
    assert a.status == 200 and a.attempts == "1"
    events = sse_data_lines(a.body)
    assert b"[DONE]" not in events
    assert events[-1].startswith(b'{"error"'), events[-1]
    assert await attempts_metric(http, url, name) == {outcome: 1}
    assert (await ready_breakers(http, url))[name]["failures"] == 1

    # A complete stream still counts as a success (and resets the consecutive failures).
    a = await post_chat(http, url, keys.team_a, "m", stream=True)
    assert a.status == 200 and sse_data_lines(a.body)[-1] == b"[DONE]"
    assert await attempts_metric(http, url, name) == {outcome: 1, "success": 1}
    assert (await ready_breakers(http, url))[name]["failures"] == 0


# ---- 3. and 4. provider quotas: no phantom counts, a bounded queue ---------------------------------


@dataclass
class QuotaScript:
    """Records the router's rate_hit calls; `refuse[name]` lists waits to answer (instead of the
    store) for the next calls on that limiter; `always[name]` refuses every call with that wait."""

    calls: list[tuple[str, float]] = field(default_factory=list)
    refuse: dict[str, list[float]] = field(default_factory=dict)
    always: dict[str, float] = field(default_factory=dict)

    def counted(self, name: str) -> int:
        return sum(1 for n, wait in self.calls if n == name and wait == 0)


@pytest.fixture
def quota(monkeypatch: pytest.MonkeyPatch) -> QuotaScript:
    script = QuotaScript()
    real_create = gateway.app.create_store

    def create_store(settings: Any) -> Any:
        store = real_create(settings)
        real_hit = store.rate_hit

        async def rate_hit(name: str, rpm: int, tpm: int, tokens: int, now: float) -> float:
            if name in script.always:
                wait = script.always[name]
            elif script.refuse.get(name):
                wait = script.refuse[name].pop(0)
            else:
                wait = await real_hit(name, rpm, tpm, tokens, now)
            script.calls.append((name, wait))
            return wait

        store.rate_hit = rate_hit
        return store

    monkeypatch.setattr(gateway.app, "create_store", create_store)
    return script


async def test_provider_quota_refusal_counts_nothing_against_the_deployment(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    quota: QuotaScript,
) -> None:
    url = await start_routed(
        {"solo": model(dep("pa", "a", rpm=100))}, providers={"pa": {"rpm": 2, "max_queue_s": 0}}
    )
    answers = [await post_chat(http, url, keys.team_a, "solo") for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert assert_error_shape(answers[2].body)["code"] == "provider_quota_exceeded"
    assert len(fakes[0].requests) == 2
    # The deployment's limiter counted exactly the requests that were sent.
    assert quota.counted("deployment:pa/a") == 2
    assert quota.counted("provider:pa") == 2


async def test_deployment_quota_refusal_does_not_count_the_provider_twice(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    quota: QuotaScript,
) -> None:
    """The provider's limiter goes first; when the deployment's then refuses and the request
    queues, the provider's count is given back, so the request is counted once in all: with a
    provider quota of 2 requests a minute, two requests fit and the third is refused."""
    url = await start_routed(
        {"solo": model(dep("pa", "a", rpm=100))}, providers={"pa": {"rpm": 2, "max_queue_s": 1.0}}
    )
    quota.refuse["deployment:pa/a"] = [0.3]
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 200, a.body
    assert a.elapsed >= 0.28
    assert len(fakes[0].requests) == 1
    b = await post_chat(http, url, keys.team_a, "solo")
    assert b.status == 200, b.body  # the provider counted the first request once, not twice
    c = await post_chat(http, url, keys.team_a, "solo")
    assert c.status == 429, c.body
    assert assert_error_shape(c.body)["code"] == "provider_quota_exceeded"
    assert len(fakes[0].requests) == 2


async def test_request_queues_for_the_provider_quota_then_succeeds(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    quota: QuotaScript,
) -> None:
    url = await start_routed(
        {"solo": model(dep("pa", "a"))}, providers={"pa": {"rpm": 100, "max_queue_s": 1.0}}
    )
    quota.refuse["provider:pa"] = [0.4]
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 200, a.body
    assert a.attempts == "1"
    assert 0.38 <= a.elapsed < 2.5, a.elapsed
    assert len(fakes[0].requests) == 1


async def test_total_queueing_is_bounded_by_max_queue_s(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    quota: QuotaScript,
) -> None:
    """Each wait fits max_queue_s, but their sum would not: 429 once the budget is spent (before:
    one wait after another until the request's deadline)."""
    url = await start_routed(
        {"solo": model(dep("pa", "a"))},
        providers={"pa": {"rpm": 100, "max_queue_s": 0.5}},
        routing_cfg=routing({"deadline_s": 10.0}),
    )
    quota.always["provider:pa"] = 0.3
    a = await post_chat(http, url, keys.team_a, "solo")
    assert a.status == 429, a.body
    assert assert_error_shape(a.body)["code"] == "provider_quota_exceeded"
    assert a.headers.get("retry-after") == "1"
    assert 0.28 <= a.elapsed < 3.0, a.elapsed  # one wait of 0.3 s; a second would exceed 0.5 s
    assert len(quota.calls) == 2
    assert fakes[0].requests == []


# ---- 5. time to first byte, total and connect timeouts ----------------------------------------------

FB_TIMEOUTS = {"connect_s": 1.0, "read_s": 5.0, "first_byte_s": 0.3, "total_s": 10.0}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_first_byte_timeout_fails_over(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    stream: bool,
) -> None:
    """Headers later than first_byte_s (within the idle read timeout) → retried elsewhere."""
    url = await start_routed({
        "duo": model(
            dep("pa", "slow-a", weight=HEAVY, timeouts=FB_TIMEOUTS), dep("pb", "fast-b", weight=LIGHT)
        )
    })
    fakes[0].default = Behaviour(delay_s=2.0)
    a = await post_chat(http, url, keys.team_a, "duo", stream=stream)
    assert a.status == 200, a.body
    assert a.deployment == "pb/fast-b" and a.attempts == "2"
    assert 0.28 <= a.elapsed < 1.8, a.elapsed
    assert await attempts_metric(http, url, "pa/slow-a") == {"timeout": 1}


def _ping_only_stream(pings: int) -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_pings", "type": "message", "role": "assistant", "model": CLAUDE, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    }
    ping = b'event: ping\ndata: {"type": "ping"}\n\n'
    return b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n" + ping * pings


async def test_anthropic_stream_of_pings_times_out_at_first_byte(
    anth: FakeAnthropic, start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """message_start then only pings, a few bytes every 20 ms (the idle read timeout never fires):
    no content within first_byte_s → 504, not a 200 that never says anything."""
    url = await start_routed(
        {"claude": model(dep("an", CLAUDE), retry={"max_attempts": 1})},
        providers={"an": {"timeouts": {"connect_s": 1.0, "read_s": 0.5, "first_byte_s": 1.0, "total_s": 10}}},
    )
    anth.default = AnthropicBehaviour(raw_stream=_ping_only_stream(200), write_size=20, chunk_delay_s=0.02)
    a = await post_chat(http, url, keys.team_a, "claude", stream=True)
    assert a.status == 504, a.body
    assert assert_error_shape(a.body)["code"] == "upstream_first_byte_timeout"
    assert 0.95 <= a.elapsed < 4.0, a.elapsed
    assert anth.requests[0].events_sent > 15  # message_start and pings did arrive meanwhile
    assert await attempts_metric(http, url, f"an/{CLAUDE}") == {"timeout": 1}


async def test_total_timeout_of_a_non_streaming_request_fails_over(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    slow = {"connect_s": 1.0, "read_s": 5.0, "total_s": 0.5}
    url = await start_routed(
        {"duo": model(dep("pa", "slow-a", weight=HEAVY, timeouts=slow), dep("pb", "fast-b", weight=LIGHT))}
    )
    fakes[0].default = Behaviour(delay_s=2.0)
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 200, a.body
    assert a.deployment == "pb/fast-b" and a.attempts == "2"
    assert 0.45 <= a.elapsed < 1.8, a.elapsed
    assert await attempts_metric(http, url, "pa/slow-a") == {"timeout": 1}


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new connections hang in SYN-SENT (Linux drops
    the SYN while tcp_abort_on_overflow is 0). Fails (never skips) where that does not hold: the
test machines are Linux."""
    with ExitStack() as stack:
        srv = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = int(srv.getsockname()[1])
        for _ in range(4):
            c = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        time.sleep(0.05)
        probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            yield port
            return
        except OSError as e:
            pytest.fail(f"cannot provoke a connect timeout here: {e}")
        pytest.fail("cannot provoke a connect timeout here: the connection was accepted")


async def test_connect_timeout_fails_over(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    unaccepting_port: int,
) -> None:
    url = await start_routed(
        {"duo": model(dep("stuck", "s", weight=HEAVY), dep("pb", "fast-b", weight=LIGHT))},
        providers={"stuck": {
            "kind": "openai_compatible", "api_base": f"http://127.0.0.1:{unaccepting_port}/v1",
            "api_key": "${TOLLWAY_TEST_UPSTREAM_KEY}",
            "timeouts": {"connect_s": 0.3, "read_s": 5.0, "total_s": 10.0},
        }},
    )
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 200, a.body
    assert a.deployment == "pb/fast-b" and a.attempts == "2"
    assert 0.28 <= a.elapsed < 2.5, a.elapsed
    assert await attempts_metric(http, url, "stuck/s") == {"timeout": 1}


# ---- 6. the fallback metric counts fallbacks that answered -------------------------------------------


async def test_fallback_metric_counts_only_answers(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({
        "primary": model(dep("pa", "p-a"), fallbacks=[{"model": "backup"}]),
        "backup": model(dep("pc", "b-c")),
    })
    fakes[0].default = Behaviour(status=503)
    fakes[2].default = Behaviour(status=503)
    a = await post_chat(http, url, keys.team_a, "primary")
    assert a.status >= 500
    assert len(fakes[2].requests) >= 1  # the fallback was tried…
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_fallbacks_total") == 0  # …but did not answer

    fakes[2].default = Behaviour()
    a = await post_chat(http, url, keys.team_a, "primary")
    assert a.status == 200 and a.headers.get("x-tollway-fallback") == "backup"
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_fallbacks_total", model="primary", fallback="backup") == 1


# ---- 7. client errors carry the routing headers -----------------------------------------------------


async def test_upstream_400_carries_routing_headers(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({"duo": model(dep("pa", "a", weight=HEAVY), dep("pb", "b", weight=LIGHT))})
    fakes[0].enqueue(Behaviour(status=400))
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.status == 400
    assert a.headers.get("x-tollway-provider") == "pa"
    assert a.deployment == "pa/a"
    assert a.attempts == "1"
    assert "x-tollway-fallback" not in a.headers


# ---- 8. lowest_latency measures a deployment that was slow once again ------------------------------


async def test_lowest_latency_measures_a_slow_deployment_again(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = await start_routed(
        {"lb": model(dep("pa", "a"), dep("pb", "b"), strategy="lowest_latency")}
    )
    fa, fb = fakes[0], fakes[1]
    monkeypatch.setattr(router_module, "LATENCY_STALE_S", 0.0)  # the latest sample decides
    monkeypatch.setattr(router_module, "LATENCY_EXPLORE", 0.0)
    fa.default, fb.default = Behaviour(delay_s=0.3), Behaviour(delay_s=0.005)
    answers = [await post_chat(http, url, keys.team_a, "lb") for _ in range(4)]
    assert [a.deployment for a in answers[2:]] == ["pb/b"] * 2  # pa was slow once

    # pa is fast now and pb slow: exploration measures pa again (bounded: p(miss) = 0.5^40).
    fa.default, fb.default = Behaviour(delay_s=0.005), Behaviour(delay_s=0.3)
    monkeypatch.setattr(router_module, "LATENCY_EXPLORE", 0.5)
    seen: set[str] = set()
    for _ in range(40):
        a = await post_chat(http, url, keys.team_a, "lb")
        assert a.status == 200
        seen.add(a.deployment or "")
        if seen == {"pa/a", "pb/b"}:
            break
    assert seen == {"pa/a", "pb/b"}, seen

    # Both measured with their new latencies: pa wins its traffic back.
    monkeypatch.setattr(router_module, "LATENCY_EXPLORE", 0.0)
    answers = [await post_chat(http, url, keys.team_a, "lb") for _ in range(2)]
    assert [a.deployment for a in answers] == ["pa/a"] * 2


# ---- 9. Anthropic streams: no usage fields unless asked -------------------------------------------


async def test_anthropic_stream_has_no_usage_unless_asked(
    anth: FakeAnthropic, start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({"claude": model(dep("an", CLAUDE))})
    a = await post_chat(http, url, keys.team_a, "claude", stream=True)
    assert a.status == 200
    events = sse_data_lines(a.body)
    assert events[-1] == b"[DONE]"
    assert b'"usage"' not in a.body, a.body
    assert all(orjson.loads(e)["choices"] for e in events[:-1])  # no usage chunk either
    # The gateway still counted the tokens (it asked the upstream for usage itself).
    text = await metrics_text(http, url)
    assert metric_value(text, "tollway_tokens_total", model="claude", kind="completion") > 0

    a = await post_chat(http, url, keys.team_a, "claude", stream=True, stream_options={"include_usage": True})
    events = sse_data_lines(a.body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # as on OpenAI
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


# ---- 10. YAML: an unquoted `on:` key in a fallback --------------------------------------------------

YAML_CONFIG = """
auth: {mode: none}
providers:
  m: {kind: mock}
models:
  a:
    price: {free: true}
    deployments: [{provider: m, model: x}]
    fallbacks:
      - {model: b, on: [server_error]}
  b:
    price: {free: true}
    deployments: [{provider: m, model: y}]
    fallbacks:
      - model: a
        on:
          - timeout
          - rate_limit
"""


def test_yaml_fallback_on_key_is_read_as_on(tmp_path: Path) -> None:
    path = tmp_path / "tollway.yaml"
    path.write_text(YAML_CONFIG, encoding="utf-8")
    settings = load_settings(path)
    assert settings.models["a"].fallbacks[0].on == ["server_error"]
    assert settings.models["b"].fallbacks[0].on == ["timeout", "rate_limit"]

    path.write_text(YAML_CONFIG.replace("{model: b, on: [server_error]}",
                                        "{model: b, on: [server_error], 'on': [timeout]}"), encoding="utf-8")
    with pytest.raises(ConfigError, match="given twice"):
        load_settings(path)


# ---- 11. a 429 with retry-after cools the deployment down for everyone ------------------------------


async def test_429_retry_after_cools_the_deployment_down(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_routed({"duo": model(dep("pa", "a", weight=HEAVY), dep("pb", "b", weight=LIGHT))})
    fa, fb = fakes[0], fakes[1]
    fa.enqueue(Behaviour(status=429, headers={"retry-after": "2"}))
    a = await post_chat(http, url, keys.team_a, "duo")
    cooled_at = time.monotonic()
    assert a.status == 200 and a.deployment == "pb/b" and a.attempts == "2"

    answers = await asyncio.gather(*(post_chat(http, url, keys.team_a, "duo") for _ in range(3)))
    answers.append(await post_chat(http, url, keys.team_a, "duo"))
    assert time.monotonic() - cooled_at < 1.8, "too slow to check the cooldown"
    assert all(x.status == 200 and x.deployment == "pb/b" and x.attempts == "1" for x in answers)
    assert len(fa.requests) == 1 and len(fb.requests) == 5
    # Only the 429 itself counted against pa's breaker.
    assert (await ready_breakers(http, url))["pa/a"]["failures"] == 1

    await asyncio.sleep(max(0.0, 2.1 - (time.monotonic() - cooled_at)))
    a = await post_chat(http, url, keys.team_a, "duo")
    assert a.deployment == "pa/a"  # cooled down: back in the rotation


async def test_429_retry_after_on_the_only_deployment_holds_other_requests(
    fakes: list[FakeUpstream], start_routed: StartRouted, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """A request arriving while the only deployment cools down waits for the end of the cooldown
    (as the rate-limited request itself does) instead of drawing another 429."""
    url = await start_routed({"solo": model(dep("pa", "a"))})
    fa = fakes[0]
    fa.enqueue(Behaviour(status=429, headers={"retry-after": "1"}))
    first = asyncio.create_task(post_chat(http, url, keys.team_a, "solo"))
    await fa.wait_for_requests(1)
    await asyncio.sleep(0.2)
    second = await post_chat(http, url, keys.team_a, "solo")
    answers: list[Answer] = [await first, second]
    assert [x.status for x in answers] == [200, 200]
    assert sorted(x.attempts or "" for x in answers) == ["1", "2"]
    assert len(fa.requests) == 3
    t429 = fa.requests[0].arrived_at
    after = [r.arrived_at - t429 for r in fa.requests[1:]]
    assert all(t >= 0.9 for t in after), after
