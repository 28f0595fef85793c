"""Issue 5: the exact cache — keys, per-team partitions, streaming replay, opt-outs, TTL,
limits and budgets on hits, the ledger, coalescing, and the admin API."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import (
    AdminClient,
    StartGateway,
    fake_usage,
    fixed_usage_reply,
    metric_value,
    metrics_text,
    nano,
    sse_data_lines,
    usd_cost,
    wait_for_cache_entries,
)

from gateway.cache.keys import cache_key
from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys, gateway_config, running_gateway
from gateway.wire.tokens import estimate_prompt_tokens

CHAT = "/v1/chat/completions"
MSGS: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
ALLOW_ALL = {"gpt-test": {"cache": {"allow_temperature": True, "allow_n": True, "allow_tools": True}}}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=15.0)


async def ask(base_url: str, key: str, **kw: Any) -> tuple[str, str, Any]:
    """(x-tollway-cache, content of choice 0, the completion) of one non-streamed SDK call."""
    kw.setdefault("messages", MSGS)
    kw.setdefault("temperature", 0)
    async with sdk(base_url, key) as c:
        raw = await c.chat.completions.with_raw_response.create(model="gpt-test", **kw)
        completion = raw.parse()
    return raw.headers.get("x-tollway-cache", ""), completion.choices[0].message.content or "", completion


async def ask_stream(base_url: str, key: str, **kw: Any) -> tuple[str, str, list[Any]]:
    """(x-tollway-cache, the streamed content, the chunks) of one streamed SDK call."""
    kw.setdefault("messages", MSGS)
    kw.setdefault("temperature", 0)
    async with sdk(base_url, key) as c:
        raw = await c.chat.completions.with_raw_response.create(model="gpt-test", stream=True, **kw)
        chunks = [ch async for ch in raw.parse()]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return raw.headers.get("x-tollway-cache", ""), text, chunks


async def raw_chat(
    http: aiohttp.ClientSession, base_url: str, key: str, body: dict[str, Any], **headers: str
) -> tuple[int, str, bytes]:
    h = {"Authorization": f"Bearer {key}", **headers}
    async with http.post(base_url + CHAT, json=body, headers=h) as r:
        return r.status, r.headers.get("x-tollway-cache", ""), await r.read()


def chat_calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.endpoint == "chat")


# ---- keys ---------------------------------------------------------------------------------------


def test_key_ignores_stream_and_keeps_what_changes_the_answer() -> None:
    body = {"model": "x", "messages": MSGS, "temperature": 0}
    k = cache_key("team-a", "gpt-test", "chat", body)
    assert k.startswith("team-a:chat:")
    same = {**body, "stream": True, "stream_options": {"include_usage": True}}
    assert cache_key("team-a", "gpt-test", "chat", same) == k
    assert cache_key("team-a", "gpt-test", "chat", {**body, "model": "alias"}) == k  # public model counts
    for change in ({"seed": 1}, {"max_tokens": 5}, {"top_p": 0.5}, {"stop": ["x"]}, {"user": "u"},
                   {"response_format": {"type": "json_object"}}, {"tools": TOOLS},
                   {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}):
        assert cache_key("team-a", "gpt-test", "chat", {**body, **change}) != k, change
    assert cache_key("team-b", "gpt-test", "chat", body) != k
    assert cache_key("team-a", "gpt-other", "chat", body) != k
    assert cache_key("team-a", "gpt-test", "completions", body) != k


# ---- hits and misses ----------------------------------------------------------------------------


async def test_identical_request_is_served_from_cache(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    h1, text1, c1 = await ask(gateway, keys.team_a)
    h2, text2, c2 = await ask(gateway, keys.team_a)
    assert (h1, h2) == ("miss", "hit-exact")
    assert text1 and text2 == text1 and c2.id == c1.id
    assert c2.usage is not None and c1.usage is not None and c2.usage.total_tokens == c1.usage.total_tokens
    assert chat_calls(fake) == 1
    h3, _, c3 = await ask(gateway, keys.team_a, messages=[{"role": "user", "content": "Other?"}])
    assert h3 == "miss" and chat_calls(fake) == 2
    m = await metrics_text(http, gateway)
    assert metric_value(m, "tollway_cache_hits_total", kind="exact") == 1
    assert metric_value(m, "tollway_cache_misses_total") == 2
    assert metric_value(m, "tollway_cache_lookup_seconds_count") == 3
    # a hit carries the stored usage: metrics (and the ledger) see its tokens
    assert c3.usage is not None
    assert metric_value(m, "tollway_tokens_total", model="gpt-test", kind="completion") == (
        2 * c1.usage.completion_tokens + c3.usage.completion_tokens
    )


async def test_streaming_replay_equals_the_original(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    fake.enqueue(Behaviour(content="Paris is the capital of France.", stream_chunks=5))
    h1, text1, chunks1 = await ask_stream(gateway, keys.team_a)
    h2, text2, chunks2 = await ask_stream(gateway, keys.team_a)
    assert (h1, h2) == ("miss", "hit-exact")
    assert text1 == text2 == "Paris is the capital of France."
    assert chat_calls(fake) == 1
    assert chunks2[0].choices[0].delta.role == "assistant"
    assert chunks2[-1].choices[0].finish_reason == chunks1[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks1[0].id for c in chunks2)
    # no usage chunk unless asked for; with include_usage it is there, after the finish chunk
    assert all(c.usage is None for c in chunks2)
    h3, _, chunks3 = await ask_stream(gateway, keys.team_a, stream_options={"include_usage": True})
    assert h3 == "hit-exact" and chunks3[-1].choices == [] and chunks3[-1].usage is not None
    assert chunks3[-1].usage.completion_tokens > 0
    # the raw stream ends with [DONE]
    status, hdr, raw = await raw_chat(
        http, gateway, keys.team_a, {"model": "gpt-test", "messages": MSGS, "temperature": 0, "stream": True}
    )
    assert status == 200 and hdr == "hit-exact" and sse_data_lines(raw)[-1] == b"[DONE]"
    assert chat_calls(fake) == 1


async def test_streamed_answer_serves_a_non_streamed_request_and_vice_versa(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.enqueue(Behaviour(content="streamed first", stream_chunks=3))
    h1, text1, _ = await ask_stream(gateway, keys.team_a)
    h2, text2, c2 = await ask(gateway, keys.team_a)
    assert (h1, h2) == ("miss", "hit-exact") and text1 == text2 == "streamed first"
    assert c2.object == "chat.completion" and c2.choices[0].finish_reason == "stop"
    assert c2.usage is not None and c2.usage.completion_tokens > 0

    other: list[Any] = [{"role": "user", "content": "non-streamed first"}]
    fake.enqueue(Behaviour(content="plain answer"))
    h3, text3, _ = await ask(gateway, keys.team_a, messages=other)
    h4, text4, _ = await ask_stream(gateway, keys.team_a, messages=other)
    assert (h3, h4) == ("miss", "hit-exact") and text3 == text4 == "plain answer"
    assert chat_calls(fake) == 2


async def test_incomplete_or_failed_answers_are_not_cached(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.enqueue(Behaviour(stream_chunks=6, error_after=3))
    with pytest.raises(openai.APIError):
        await ask_stream(gateway, keys.team_a)
    fake.enqueue(Behaviour(status=500))
    with pytest.raises(openai.APIStatusError):
        await ask(gateway, keys.team_a)
    body = fixed_usage_reply(3, 3)
    body["choices"][0]["finish_reason"] = "content_filter"
    fake.enqueue(Behaviour(body=body))
    h, _, _ = await ask(gateway, keys.team_a)
    assert h == "miss"
    h, _, _ = await ask(gateway, keys.team_a)
    assert h == "miss"  # the content_filter answer was not kept; this one is
    h, _, _ = await ask(gateway, keys.team_a)
    assert h == "hit-exact"
    assert chat_calls(fake) == 4


# ---- cacheability ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [{"temperature": 0.7}, {}, {"temperature": 0, "n": 2}, {"temperature": 0, "tools": TOOLS}],
    ids=["temperature", "default-temperature", "n", "tools"],
)
async def test_sampling_n_and_tools_are_not_cached_by_default(
    gateway: str, fake: FakeUpstream, keys: TestKeys, args: dict[str, Any]
) -> None:
    """A missing temperature is the API default (1): the answer is sampled, so not cached."""
    async with sdk(gateway, keys.team_a) as c:
        for _ in range(2):
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-test", messages=MSGS, **args
            )
            assert raw.headers["x-tollway-cache"] == "bypass"
    assert chat_calls(fake) == 2


@pytest.mark.parametrize(
    "extra", [{"temperature": 0.7}, {"n": 2}, {"tools": TOOLS}], ids=["temperature", "n", "tools"]
)
async def test_model_config_allows_sampling_n_and_tools(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys, extra: dict[str, Any]
) -> None:
    url = await start_gateway(models=ALLOW_ALL)
    h1, t1, _ = await ask(url, keys.team_a, **extra)
    h2, t2, _ = await ask(url, keys.team_a, **extra)
    assert (h1, h2) == ("miss", "hit-exact") and t1 == t2
    assert chat_calls(fake) == 1


async def test_cache_control_no_cache_and_no_store(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0}
    fake.enqueue(Behaviour(content="first"), Behaviour(content="second"), Behaviour(content="third"))
    s, h, raw = await raw_chat(http, gateway, keys.team_a, body, **{"Cache-Control": "no-store"})
    assert (s, h) == (200, "miss")
    s, h, raw = await raw_chat(http, gateway, keys.team_a, body)
    assert (s, h) == (200, "miss")  # no-store: nothing was written
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "second"
    s, h, raw = await raw_chat(http, gateway, keys.team_a, body, **{"Cache-Control": "no-cache"})
    assert (s, h) == (200, "miss")  # no-cache: not read, but the fresh answer is written
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "third"
    s, h, raw = await raw_chat(http, gateway, keys.team_a, body)
    assert h == "hit-exact" and orjson.loads(raw)["choices"][0]["message"]["content"] == "third"
    s, h, raw = await raw_chat(http, gateway, keys.team_a, body, **{"Cache-Control": "no-cache, no-store"})
    assert h == "bypass"
    assert chat_calls(fake) == 4


async def test_disabled_per_model_and_embeddings_bypass(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys
) -> None:
    url = await start_gateway(models={"gpt-test": {"cache": {"enabled": False}}})
    assert (await ask(url, keys.team_a))[0] == "bypass"
    assert (await ask(url, keys.team_a))[0] == "bypass"
    async with sdk(url, keys.team_a) as c:
        raw = await c.embeddings.with_raw_response.create(model="embed-test", input="hi")
        assert raw.headers["x-tollway-cache"] == "bypass"


# ---- partitions ---------------------------------------------------------------------------------


async def test_no_cross_team_hits(gateway: str, fake: FakeUpstream, keys: TestKeys) -> None:
    fake.enqueue(Behaviour(content="answer for team A"), Behaviour(content="answer for team B"))
    ha, ta, _ = await ask(gateway, keys.team_a)
    hb, tb, _ = await ask(gateway, keys.team_b)
    assert (ha, ta) == ("miss", "answer for team A")
    assert (hb, tb) == ("miss", "answer for team B")  # team B never sees team A's entry
    hb2, tb2, _ = await ask_stream(gateway, keys.team_b)
    ha2, ta2, _ = await ask(gateway, keys.team_a)
    assert (hb2, tb2) == ("hit-exact", "answer for team B")
    assert (ha2, ta2) == ("hit-exact", "answer for team A")
    assert chat_calls(fake) == 2


async def test_shared_partition_when_configured(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys
) -> None:
    url = await start_gateway(cache={"shared_partition": True})
    fake.enqueue(Behaviour(content="shared answer"))
    ha, ta, _ = await ask(url, keys.team_a)
    hb, tb, _ = await ask(url, keys.team_b)
    assert (ha, hb) == ("miss", "hit-exact") and ta == tb == "shared answer"
    assert chat_calls(fake) == 1


async def test_entries_expire_after_the_model_ttl(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys
) -> None:
    url = await start_gateway(models={"gpt-test": {"cache": {"ttl_s": 0.4}}})
    assert (await ask(url, keys.team_a))[0] == "miss"
    assert (await ask(url, keys.team_a))[0] == "hit-exact"
    await asyncio.sleep(0.6)
    assert (await ask(url, keys.team_a))[0] == "miss"
    assert chat_calls(fake) == 2


# ---- hits pass limits and budgets, and are on the ledger ----------------------------------------


async def test_hits_are_rate_limited(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    admin = AdminClient(http, gateway, keys.admin)
    await admin.create_team(id="rl", name="rl")
    k = await admin.create_key(team_id="rl", rpm=2)
    assert (await ask(gateway, k["key"]))[0] == "miss"
    assert (await ask(gateway, k["key"]))[0] == "hit-exact"
    with pytest.raises(openai.RateLimitError):
        await ask(gateway, k["key"])
    assert chat_calls(fake) == 1


async def test_hits_are_budget_checked(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    admin = AdminClient(http, gateway, keys.admin)
    await admin.create_team(id="bud", name="bud")
    k = await admin.create_key(team_id="bud", budget={"limit_usd": 0.0002, "period": "daily"})
    fake.enqueue(Behaviour(body=fixed_usage_reply(100, 100)))  # costs $0.0003: over budget
    assert (await ask(gateway, k["key"], max_tokens=10))[0] == "miss"
    await admin.settled(k["id"], 1)
    with pytest.raises(openai.RateLimitError) as ei:
        await ask(gateway, k["key"], max_tokens=10)
    assert ei.value.response.json()["error"]["code"] == "budget_exceeded"
    assert chat_calls(fake) == 1


async def test_hits_are_on_the_ledger_as_cached_at_the_configured_price(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(fake.base_url, budgets={"cache_hit_cost_fraction": 0.5})
    db = config["store"]["path"]
    fake.enqueue(Behaviour(body=fixed_usage_reply(1000, 500)))
    async with running_gateway(config) as url:
        admin = AdminClient(http, url, keys.admin)
        k = await admin.create_key(team_id="team-a")
        assert (await ask(url, k["key"]))[0] == "miss"
        assert (await ask(url, k["key"]))[0] == "hit-exact"
        b, n = await admin.settled(k["id"], 2)
        assert n == 2
        full = usd_cost(1000, 500)
        assert b["spent_usd"] == pytest.approx(full * 1.5, abs=1e-12)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT cache, prompt_tokens, completion_tokens, cost_nano FROM ledger WHERE key_id = ? "
            "ORDER BY ts", (k["id"],)
        ).fetchall()
    assert rows == [("miss", 1000, 500, round(full * 1e9)), ("hit-exact", 1000, 500, round(full * 0.5e9))]


# ---- coalescing ---------------------------------------------------------------------------------


async def test_concurrent_identical_misses_are_coalesced(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.enqueue(Behaviour(content="one answer for all", delay_s=0.4))
    results = await asyncio.gather(*(ask(gateway, keys.team_a) for _ in range(10)))
    assert chat_calls(fake) == 1
    assert {r[1] for r in results} == {"one answer for all"}
    assert sorted(r[0] for r in results) == ["hit-exact"] * 9 + ["miss"]


async def test_concurrent_identical_streams_are_coalesced(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.enqueue(Behaviour(content="streamed to everyone", stream_chunks=4, chunk_delay_s=0.1))
    results = await asyncio.gather(*(ask_stream(gateway, keys.team_a) for _ in range(5)))
    assert chat_calls(fake) == 1
    assert {r[1] for r in results} == {"streamed to everyone"}
    assert sorted(r[0] for r in results) == ["hit-exact"] * 4 + ["miss"]


async def test_waiters_go_upstream_when_the_leader_fails(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.enqueue(Behaviour(status=500, delay_s=0.3))
    results = await asyncio.gather(*(ask(gateway, keys.team_a) for _ in range(4)), return_exceptions=True)
    assert sum(isinstance(r, openai.InternalServerError) for r in results) == 1
    ok = [r for r in results if isinstance(r, tuple)]
    assert len(ok) == 3 and chat_calls(fake) == 4


async def test_other_teams_do_not_wait_for_each_other(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.default = Behaviour(delay_s=0.3)
    results = await asyncio.gather(ask(gateway, keys.team_a), ask(gateway, keys.team_b))
    assert [r[0] for r in results] == ["miss", "miss"] and chat_calls(fake) == 2


# ---- admin ----------------------------------------------------------------------------------------


async def test_admin_purge_and_stats(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    admin = AdminClient(http, gateway, keys.admin)
    await ask(gateway, keys.team_a)
    await ask(gateway, keys.team_a)
    await ask(gateway, keys.team_a, messages=[{"role": "user", "content": "second question"}])
    await ask(gateway, keys.team_b)
    await asyncio.sleep(0.05)  # writes are off the response path
    stats = await admin.ok("GET", "/admin/cache/stats")
    a, b = stats["teams"]["team-a"], stats["teams"]["team-b"]
    assert (a["entries"], a["hits"], a["misses"]) == (2, 1, 2) and a["bytes"] > 0
    assert (b["entries"], b["hits"], b["misses"]) == (1, 0, 1)
    only_b = await admin.ok("GET", "/admin/cache/stats?team_id=team-b")
    assert set(only_b["teams"]) == {"team-b"}

    assert (await admin.ok("DELETE", "/admin/cache?team_id=team-a&model=gpt-test"))["deleted"] == 2
    assert (await ask(gateway, keys.team_a))[0] == "miss"
    assert (await ask(gateway, keys.team_b))[0] == "hit-exact"
    assert (await admin.ok("DELETE", "/admin/cache"))["deleted"] == 2
    assert (await ask(gateway, keys.team_b))[0] == "miss"

    status, _, _ = await admin.call("DELETE", "/admin/cache", headers={"Authorization": "Bearer nope"})
    assert status == 401
    status, _, _ = await admin.call(
        "GET", "/admin/cache/stats", headers={"Authorization": f"Bearer {keys.team_a}"}
    )
    assert status == 401


# ---- more shapes: completions, tool calls ------------------------------------------------------


async def test_completions_endpoint_hit_and_stream_replay(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.enqueue(Behaviour(content="once upon a time", stream_chunks=3))
    async with sdk(gateway, keys.team_a) as c:
        raw = await c.completions.with_raw_response.create(
            model="instruct-test", prompt="Tell a story", temperature=0, stream=True
        )
        text1 = "".join([ch.choices[0].text async for ch in raw.parse() if ch.choices])
        assert raw.headers["x-tollway-cache"] == "miss"
        raw2 = await c.completions.with_raw_response.create(
            model="instruct-test", prompt="Tell a story", temperature=0
        )
        assert raw2.headers["x-tollway-cache"] == "hit-exact"
        comp = raw2.parse()
        raw3 = await c.completions.with_raw_response.create(
            model="instruct-test", prompt="Tell a story", temperature=0, stream=True
        )
        text3 = "".join([ch.choices[0].text async for ch in raw3.parse() if ch.choices])
    assert raw3.headers["x-tollway-cache"] == "hit-exact"
    assert text1 == comp.choices[0].text == text3 == "once upon a time"
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "stop"
    assert chat_calls(fake) == 0 and len(fake.requests) == 1


async def test_streamed_tool_calls_are_assembled_and_replayed(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys
) -> None:
    url = await start_gateway(models=ALLOW_ALL)
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    fake.enqueue(Behaviour(tool_arguments={"city": "Paris"}))
    async with sdk(url, keys.team_a) as c:
        s = await c.chat.completions.create(
            model="gpt-test", messages=MSGS, temperature=0, tools=TOOLS, tool_choice=choice, stream=True
        )
        args1 = "".join(
            [tc.function.arguments or "" async for ch in s if ch.choices
             for tc in (ch.choices[0].delta.tool_calls or []) if tc.function]
        )
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MSGS, temperature=0, tools=TOOLS, tool_choice=choice
        )
    assert raw.headers["x-tollway-cache"] == "hit-exact"
    msg = raw.parse().choices[0]
    assert msg.finish_reason == "tool_calls" and msg.message.tool_calls
    call = msg.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    assert orjson.loads(call.function.arguments) == orjson.loads(args1) == {"city": "Paris"}
    assert chat_calls(fake) == 1


# ---- config and store details ------------------------------------------------------------------


async def test_exact_cache_must_come_after_access(fake: FakeUpstream) -> None:
    from gateway.settings import ConfigError

    config = gateway_config(fake.base_url, plugins=[{"name": "exact_cache"}, {"name": "access"}])
    with pytest.raises(ConfigError, match="after access"):
        async with running_gateway(config):
            pass


async def test_embedded_cache_is_bounded(tmp_path: Any) -> None:
    from gateway.store.embedded import EmbeddedStore

    store = EmbeddedStore(tmp_path / "t.db", cache_max_bytes=100)
    await store.start()
    try:
        for i in range(5):
            await store.cache_put(f"t:chat:{i}", b"x" * 30, 60, "t", "m")
        await store.cache_get("t:chat:2")  # recently used: kept
        await store.cache_put("t:chat:5", b"x" * 30, 60, "t", "m")
        kept = [i for i in range(6) if await store.cache_get(f"t:chat:{i}") is not None]
        assert kept == [2, 4, 5]
        await store.cache_put("t:chat:big", b"x" * 101, 60, "t", "m")
        assert await store.cache_get("t:chat:big") is None
        assert (await store.cache_stats())["t"].bytes == 90
    finally:
        await store.close()


async def test_entries_are_shared_by_gateways_on_redis(
    fake: FakeUpstream, keys: TestKeys, tmp_path: Any
) -> None:
    from gateway.testing.redis_server import RedisServer

    with RedisServer() as srv:
        store = {"backend": "redis", "url": srv.url, "prefix": "cache-test:"}
        async with (
            running_gateway(gateway_config(fake.base_url, store=store)) as one,
            running_gateway(gateway_config(fake.base_url, store=store)) as two,
        ):
            fake.enqueue(Behaviour(content="from replica one"))
            assert (await ask(one, keys.team_a))[:2] == ("miss", "from replica one")
            await asyncio.sleep(0.1)  # the write is off the response path
            assert (await ask(two, keys.team_a))[:2] == ("hit-exact", "from replica one")
            assert (await ask(two, keys.team_b))[0] == "miss"  # still per team
            async with aiohttp.ClientSession() as http:
                admin = AdminClient(http, two, keys.admin)
                stats = await admin.ok("GET", "/admin/cache/stats")
                assert stats["teams"]["team-a"]["entries"] == 1
                assert stats["teams"]["team-a"]["hits"] == 1
                assert (await admin.ok("DELETE", "/admin/cache?team_id=team-a"))["deleted"] == 1
            assert (await ask(one, keys.team_a))[0] == "miss"


async def test_answers_over_max_entry_bytes_are_not_cached(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys
) -> None:
    url = await start_gateway(cache={"max_entry_bytes": 1024})
    fake.enqueue(Behaviour(content="x" * 2000), Behaviour(content="y" * 20_000, stream_chunks=400))
    assert (await ask(url, keys.team_a))[0] == "miss"
    h, text, _ = await ask_stream(url, keys.team_a)
    assert h == "miss" and text == "y" * 20_000  # the client still gets everything
    assert (await ask(url, keys.team_a))[0] == "miss"
    assert (await ask(url, keys.team_a))[0] == "hit-exact"
    assert chat_calls(fake) == 3


async def test_waiters_go_upstream_when_the_leader_disconnects(
    gateway: str, fake: FakeUpstream, keys: TestKeys
) -> None:
    fake.default = Behaviour(delay_s=0.5)
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0}
    headers = {"Authorization": f"Bearer {keys.team_a}"}

    async def leader() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as http:
            with pytest.raises(asyncio.TimeoutError):
                async with http.post(gateway + CHAT, json=body, headers=headers) as r:
                    await r.read()

    async def waiter() -> tuple[str, str, Any]:
        await asyncio.sleep(0.05)
        return await ask(gateway, keys.team_a)

    _, (h, text, _) = await asyncio.gather(leader(), waiter())
    assert h == "miss" and text
    assert chat_calls(fake) == 2 and fake.requests[0].client_gone


# ---- hits are admitted at their known cost (charged at once, real tokens against TPM) ----------


async def post_chat(
    http: aiohttp.ClientSession, base_url: str, key: str, body: dict[str, Any]
) -> tuple[int, Any, dict[str, Any]]:
    """(status, headers, parsed JSON body) of one raw chat request."""
    async with http.post(base_url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, r.headers, orjson.loads(await r.read())


async def exact_hits(http: aiohttp.ClientSession, base_url: str) -> float:
    return metric_value(await metrics_text(http, base_url), "tollway_cache_hits_total", kind="exact")


async def test_hit_is_charged_its_cost_fraction_at_once(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession, store_config: dict[str, Any]
) -> None:
    """A hit's cost is known: it is spent at admission (no reservation to settle) at
    `cache_hit_cost_fraction` of the stored usage's price. Its budget fits exactly what the miss
    and the hit cost, which a worst-case reservation for the hit would not fit."""
    prompt, completion = 1001, 333
    full = nano(usd_cost(prompt, completion))  # 1001 * $1/M + 333 * $2/M = 1_667_000 nano-USD
    half = round(full * 0.5)
    assert (full, half) == (1_667_000, 833_500)
    worst_case = nano(usd_cost(estimate_prompt_tokens({"messages": MSGS}), 500))
    assert half < worst_case < full + half  # a reservation fits the miss but not the hit
    config = gateway_config(fake.base_url, budgets={"cache_hit_cost_fraction": 0.5}, **store_config)
    fake.enqueue(Behaviour(body=fixed_usage_reply(prompt, completion)))
    async with running_gateway(config) as url:
        admin = AdminClient(http, url, keys.admin)
        await admin.create_team(id="half", name="half", budget={"limit_usd": 1.0, "period": "monthly"})
        k = await admin.create_key(
            team_id="half", budget={"limit_usd": (full + half) / 1e9, "period": "daily"}
        )
        assert (await ask(url, k["key"], max_tokens=500))[0] == "miss"
        b, n = await admin.settled(k["id"], 1)
        assert (nano(b["spent_usd"]), b["reserved_usd"], n) == (full, 0, 1)
        await wait_for_cache_entries(admin, "half", 1)

        h, _, c = await ask(url, k["key"], max_tokens=500)
        assert h == "hit-exact"
        assert c.usage is not None
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (prompt, completion)
        # right after the response: already spent, nothing reserved, on the key and its team
        b = await admin.budget("key", k["id"])
        assert (nano(b["spent_usd"]), b["reserved_usd"]) == (full + half, 0)
        assert b["remaining_usd"] == 0
        t = await admin.budget("team", "half")
        assert (nano(t["spent_usd"]), t["reserved_usd"]) == (full + half, 0)

        # the key's budget is used up: the next hit is refused
        with pytest.raises(openai.RateLimitError) as ei:
            await ask(url, k["key"], max_tokens=500)
        assert ei.value.response.json()["error"]["code"] == "budget_exceeded"
        assert ei.value.response.headers.get("x-tollway-cache") != "hit-exact"

        # the ledger: the miss at full price, the hit at half, the refusal at 0; charged once
        b, n = await admin.settled(k["id"], 3)
        assert (nano(b["spent_usd"]), b["reserved_usd"], n) == (full + half, 0, 3)
        rows = (await admin.spend(group_by="key"))["rows"]
        (row,) = [r for r in rows if r["key_id"] == k["id"]]
        assert (row["requests"], nano(row["cost_usd"])) == (3, full + half)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (2 * prompt, 2 * completion)
        assert await exact_hits(http, url) == 1
    assert chat_calls(fake) == 1


async def test_hit_refused_by_the_rpm_limit_is_not_served_nor_counted(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(budgets={"cache_hit_cost_fraction": 0.5})
    admin = AdminClient(http, url, keys.admin)
    await admin.create_team(id="rpm2", name="rpm2")
    k = await admin.create_key(team_id="rpm2", name="two a minute", rpm=2)
    fake.enqueue(Behaviour(body=fixed_usage_reply(100, 40)))
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0, "max_tokens": 50}

    status, headers, first = await post_chat(http, url, k["key"], body)
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    await wait_for_cache_entries(admin, "rpm2", 1)
    status, headers, second = await post_chat(http, url, k["key"], body)
    assert (status, headers["x-tollway-cache"]) == (200, "hit-exact")
    assert second == first
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert await exact_hits(http, url) == 1

    status, headers, err = await post_chat(http, url, k["key"], body)
    assert status == 429
    assert headers.get("x-tollway-cache") != "hit-exact"
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert (err["error"]["code"], err["error"]["type"]) == ("rate_limit_exceeded", "requests")
    assert "choices" not in err
    m = await metrics_text(http, url)
    assert metric_value(m, "tollway_cache_hits_total", kind="exact") == 1  # not counted as a hit
    assert metric_value(m, "tollway_access_rejections_total", reason="rate_limited", scope="key") == 1
    assert metric_value(m, "tollway_tokens_total", model="gpt-test", kind="completion") == 2 * 40
    assert chat_calls(fake) == 1

    # on the ledger: the miss at full price, the hit at half, the refused request at 0
    b, n = await admin.settled(k["id"], 3)
    assert (n, b["reserved_usd"]) == (3, 0)
    full = nano(usd_cost(100, 40))
    assert nano(b["spent_usd"]) == full + round(full * 0.5)
    (row,) = [r for r in (await admin.spend(group_by="key"))["rows"] if r["key_id"] == k["id"]]
    assert (row["requests"], nano(row["cost_usd"])) == (3, full + round(full * 0.5))
    assert (row["prompt_tokens"], row["completion_tokens"]) == (200, 80)


async def test_hits_refused_by_key_checks_are_not_served(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    """An answer found before admission is dropped when admission refuses the key (401, 403)."""
    admin = AdminClient(http, gateway, keys.admin)
    await admin.create_team(id="chk", name="chk")
    filler = await admin.create_key(team_id="chk", name="filler")
    other_model = await admin.create_key(team_id="chk", allowed_models=["mock-chat"])
    doomed = await admin.create_key(team_id="chk", name="doomed")
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0}
    status, headers, _ = await post_chat(http, gateway, filler["key"], body)
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    await wait_for_cache_entries(admin, "chk", 1)
    status, headers, _ = await post_chat(http, gateway, doomed["key"], body)
    assert (status, headers["x-tollway-cache"]) == (200, "hit-exact")  # the gateway knows this key now
    assert await exact_hits(http, gateway) == 1

    await admin.ok("POST", f"/admin/keys/{doomed['id']}/revoke")
    status, headers, err = await post_chat(http, gateway, doomed["key"], body)
    assert (status, err["error"]["code"]) == (401, "revoked_api_key")
    assert headers.get("x-tollway-cache") != "hit-exact" and "choices" not in err
    status, headers, err = await post_chat(http, gateway, other_model["key"], body)
    assert (status, err["error"]["code"]) == (403, "model_not_allowed")
    assert headers.get("x-tollway-cache") != "hit-exact" and "choices" not in err
    assert await exact_hits(http, gateway) == 1
    assert chat_calls(fake) == 1


async def test_hits_count_their_real_tokens_against_tpm(
    gateway: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    """A hit is admitted on the cached answer's usage (prompt + completion), not on the estimate
    (prompt estimate + max_tokens): a TPM limit of 3 hits fits exactly 3, one token less fits 2."""
    prompt, completion = fake_usage(MSGS)
    per_hit = prompt + completion
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0, "max_tokens": 10}
    assert estimate_prompt_tokens(body) + 10 != per_hit  # the two must differ for this test to tell
    admin = AdminClient(http, gateway, keys.admin)
    await admin.create_team(id="tpmhit", name="tpmhit")
    filler = await admin.create_key(team_id="tpmhit", name="filler")  # no limits: stores the answer
    exact3 = await admin.create_key(team_id="tpmhit", name="three hits", tpm=3 * per_hit)
    under3 = await admin.create_key(team_id="tpmhit", name="two hits", tpm=3 * per_hit - 1)

    status, headers, answer = await post_chat(http, gateway, filler["key"], body)
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (prompt, completion)
    await wait_for_cache_entries(admin, "tpmhit", 1)

    async def hits_until_refused(k: dict[str, Any]) -> tuple[list[str], Any, dict[str, Any]]:
        remaining: list[str] = []
        for _ in range(5):
            status, headers, data = await post_chat(http, gateway, k["key"], body)
            if status != 200:
                return remaining, headers, data
            assert headers["x-tollway-cache"] == "hit-exact" and data == answer
            remaining.append(headers["x-ratelimit-remaining-tokens"])
        raise AssertionError(f"{k['name']}: never refused")

    for k, limit, admitted in ((exact3, 3 * per_hit, 3), (under3, 3 * per_hit - 1, 2)):
        remaining, headers, err = await hits_until_refused(k)
        assert len(remaining) == admitted, (k["name"], remaining)
        # the first hit of a fresh key: its window holds exactly the cached answer's tokens
        assert remaining[0] == str(limit - per_hit)
        assert headers["x-ratelimit-limit-tokens"] == str(limit)
        assert headers.get("x-tollway-cache") != "hit-exact"
        assert (err["error"]["code"], err["error"]["type"]) == ("rate_limit_exceeded", "tokens")
        assert int(headers["retry-after"]) >= 1
    m = await metrics_text(http, gateway)
    assert metric_value(m, "tollway_cache_hits_total", kind="exact") == 3 + 2
    assert metric_value(m, "tollway_access_rejections_total", reason="rate_limited", scope="key") == 2
    assert chat_calls(fake) == 1


# ---- rate-limit headers and cache stats, with the lookup before admission -----------------------

RATE_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


def assert_rate_headers(headers: Any, rpm: int, tpm: int) -> None:
    """All six x-ratelimit-* headers, with the key's limits."""
    missing = [h for h in RATE_HEADERS if h not in headers]
    assert not missing, (missing, dict(headers))
    assert headers["x-ratelimit-limit-requests"] == str(rpm)
    assert headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert 0 <= int(headers["x-ratelimit-remaining-requests"]) < rpm
    assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) < tpm
    for kind in ("requests", "tokens"):
        assert re.fullmatch(r"(\d+m)?\d+m?s", headers[f"x-ratelimit-reset-{kind}"]), dict(headers)


async def test_rate_limit_headers_keep_the_cache_header(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession, store_config: dict[str, Any]
) -> None:
    """The exact cache sets x-tollway-cache before admission; the access plugin's x-ratelimit-*
    headers are added to it, not in its place (bypass, miss and hit alike)."""
    async with running_gateway(gateway_config(fake.base_url, **store_config)) as url:
        admin = AdminClient(http, url, keys.admin)
        await admin.create_team(id="hdr", name="hdr")
        k = await admin.create_key(team_id="hdr", rpm=10, tpm=100_000)
        sampled = {"model": "gpt-test", "messages": MSGS, "temperature": 0.7}
        cacheable = {"model": "gpt-test", "messages": MSGS, "temperature": 0}

        status, headers, _ = await post_chat(http, url, k["key"], sampled)
        assert (status, headers.get("x-tollway-cache")) == (200, "bypass")
        assert_rate_headers(headers, 10, 100_000)

        status, headers, first = await post_chat(http, url, k["key"], cacheable)
        assert (status, headers.get("x-tollway-cache")) == (200, "miss")
        assert_rate_headers(headers, 10, 100_000)
        await wait_for_cache_entries(admin, "hdr", 1)  # the next one is found before admission

        status, headers, second = await post_chat(http, url, k["key"], cacheable)
        assert (status, headers.get("x-tollway-cache")) == (200, "hit-exact")
        assert second == first
        assert_rate_headers(headers, 10, 100_000)
        # the same headers, streamed (the replay's response headers)
        async with http.post(
            url + CHAT, json={**cacheable, "stream": True}, headers={"Authorization": f"Bearer {k['key']}"}
        ) as r:
            assert (r.status, r.headers.get("x-tollway-cache")) == (200, "hit-exact")
            assert_rate_headers(r.headers, 10, 100_000)
            assert sse_data_lines(await r.read())[-1] == b"[DONE]"
    assert chat_calls(fake) == 2  # the bypass and the miss


async def team_cache_stats(admin: AdminClient, team: str) -> dict[str, int]:
    stats = await admin.ok("GET", f"/admin/cache/stats?team_id={team}")
    out: dict[str, int] = stats["teams"][team]
    return out


def lookups(stats: dict[str, int]) -> tuple[int, int, int, int]:
    """(hits, exact_hits, misses, semantic_hits) of one team's /admin/cache/stats."""
    return stats["hits"], stats["exact_hits"], stats["misses"], stats["semantic_hits"]


async def test_cache_stats_count_only_admitted_lookups(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession, store_config: dict[str, Any]
) -> None:
    """A lookup made before admission is counted in /admin/cache/stats only if the request was
    admitted: requests refused by the RPM limit, a revoked key or a model the key may not use
    found the entry, but count neither as hits nor as misses."""
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0}
    async with running_gateway(gateway_config(fake.base_url, **store_config)) as url:
        admin = AdminClient(http, url, keys.admin)
        await admin.create_team(id="cstats", name="cstats")
        limited = await admin.create_key(team_id="cstats", name="two a minute", rpm=2)
        other_model = await admin.create_key(team_id="cstats", allowed_models=["mock-chat"])
        doomed = await admin.create_key(team_id="cstats", name="doomed")

        status, headers, answer = await post_chat(http, url, limited["key"], body)
        assert (status, headers["x-tollway-cache"]) == (200, "miss")
        await wait_for_cache_entries(admin, "cstats", 1)
        status, headers, data = await post_chat(http, url, limited["key"], body)
        assert (status, headers["x-tollway-cache"], data) == (200, "hit-exact", answer)
        for _ in range(2):
            status, headers, err = await post_chat(http, url, limited["key"], body)
            assert (status, err["error"]["code"]) == (429, "rate_limit_exceeded")
            assert headers.get("x-tollway-cache") != "hit-exact" and "choices" not in err
        st = await team_cache_stats(admin, "cstats")
        assert lookups(st) == (1, 1, 1, 0), st
        assert st["entries"] == 1

        # a key the gateway has seen (so its lookup runs), then revoked; a key not allowed the model
        status, headers, data = await post_chat(http, url, doomed["key"], body)
        assert (status, headers["x-tollway-cache"], data) == (200, "hit-exact", answer)
        assert lookups(await team_cache_stats(admin, "cstats")) == (2, 2, 1, 0)
        await admin.ok("POST", f"/admin/keys/{doomed['id']}/revoke")
        status, _, err = await post_chat(http, url, doomed["key"], body)
        assert (status, err["error"]["code"]) == (401, "revoked_api_key")
        status, _, err = await post_chat(http, url, other_model["key"], body)
        assert (status, err["error"]["code"]) == (403, "model_not_allowed")
        st = await team_cache_stats(admin, "cstats")
        assert lookups(st) == (2, 2, 1, 0), st

        # the metrics agree: 2 exact hits, 1 miss
        m = await metrics_text(http, url)
        assert metric_value(m, "tollway_cache_hits_total", kind="exact") == 2
        assert metric_value(m, "tollway_cache_misses_total", kind="exact") == 1
    assert chat_calls(fake) == 1


# ---- the model's default output cap is part of the key ------------------------------------------


async def test_no_max_tokens_shares_the_entry_of_the_default_cap(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys
) -> None:
    """Without max_tokens the gateway sends the model's max_output_tokens upstream: the answer is
    the one for max_tokens = that cap, and only for that cap."""
    url = await start_gateway(models={"gpt-test": {"max_output_tokens": 321}})
    fake.enqueue(Behaviour(content="capped by default"), Behaviour(content="capped at 100"))
    assert (await ask(url, keys.team_a))[:2] == ("miss", "capped by default")
    assert fake.requests[-1].body["max_tokens"] == 321  # what the gateway sent for "no cap"
    assert (await ask(url, keys.team_a, max_tokens=321))[:2] == ("hit-exact", "capped by default")
    assert (await ask(url, keys.team_a, max_tokens=100))[:2] == ("miss", "capped at 100")
    assert fake.requests[-1].body["max_tokens"] == 100
    assert (await ask(url, keys.team_a))[:2] == ("hit-exact", "capped by default")
    assert (await ask(url, keys.team_a, max_tokens=100))[:2] == ("hit-exact", "capped at 100")
    assert chat_calls(fake) == 2


async def test_a_changed_default_cap_does_not_serve_answers_cut_at_the_old_one(
    fake: FakeUpstream, keys: TestKeys
) -> None:
    """Two gateways sharing one store (Redis) with different max_output_tokens: an answer stored
    for "no max_tokens" under one cap is not served for "no max_tokens" under the other."""
    from gateway.testing.redis_server import RedisServer

    async with RedisServer() as srv:
        store = {"store": {"backend": "redis", "url": srv.url, "prefix": "cap-test:"}}
        small = gateway_config(fake.base_url, models={"gpt-test": {"max_output_tokens": 16}}, **store)
        large = gateway_config(fake.base_url, models={"gpt-test": {"max_output_tokens": 4096}}, **store)
        fake.enqueue(Behaviour(content="cut at 16"), Behaviour(content="up to 4096"))
        async with (
            running_gateway(small) as one,
            running_gateway(large) as two,
            aiohttp.ClientSession() as http,
        ):
            assert (await ask(one, keys.team_a))[:2] == ("miss", "cut at 16")
            await wait_for_cache_entries(AdminClient(http, one, keys.admin), "team-a", 1)
            assert (await ask(two, keys.team_a))[:2] == ("miss", "up to 4096")
            assert (await ask(two, keys.team_a, max_tokens=16))[:2] == ("hit-exact", "cut at 16")
            assert (await ask(one, keys.team_a, max_tokens=4096))[:2] == ("hit-exact", "up to 4096")
    assert [r.body["max_tokens"] for r in fake.requests] == [16, 4096]
