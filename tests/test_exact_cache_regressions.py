"""Regression tests of the exact cache: the default output cap in open mode, coalesced waiters in
/admin/cache/stats, and `/v1/completions` with `max_tokens: 0`."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from helpers import AdminClient, StartGateway, metric_value, metrics_text, wait_for_cache_entries

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys, gateway_config, running_gateway

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def calls(fake: FakeUpstream, endpoint: str) -> int:
    return sum(1 for r in fake.requests if r.endpoint == endpoint)


async def post(
    http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], key: str | None = None
) -> tuple[int, str, dict[str, Any]]:
    """(status, x-tollway-cache, parsed JSON body) of one raw request (no key: no Authorization)."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.post(url + path, json=body, headers=headers) as r:
        return r.status, r.headers.get("x-tollway-cache", ""), orjson.loads(await r.read())


# ---- 1. open mode: the gateway sends no default cap, so none is in the key ----------------------


async def test_open_mode_no_max_tokens_does_not_share_the_entry_of_the_default_cap(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    """With `auth: {mode: none}` a request without max_tokens goes upstream without one: its
    answer is not the answer for max_tokens = the model's max_output_tokens (keys mode sends
    that cap, so there the two share an entry)."""
    url = await start_gateway(
        auth={"mode": "none", "keys": None}, models={"gpt-test": {"max_output_tokens": 321}}
    )
    admin = AdminClient(http, url, keys.admin)
    fake.enqueue(Behaviour(content="no cap at all"), Behaviour(content="capped at 321"))
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0}

    status, cache, data = await post(http, url, CHAT, body)
    assert (status, cache, data["choices"][0]["message"]["content"]) == (200, "miss", "no cap at all")
    assert "max_tokens" not in fake.requests[-1].body, fake.requests[-1].body
    await wait_for_cache_entries(admin, "default", 1)

    status, cache, data = await post(http, url, CHAT, {**body, "max_tokens": 321})
    assert (status, cache, data["choices"][0]["message"]["content"]) == (200, "miss", "capped at 321")
    assert fake.requests[-1].body["max_tokens"] == 321
    assert calls(fake, "chat") == 2
    await wait_for_cache_entries(admin, "default", 2)

    # each is still served its own answer
    status, cache, data = await post(http, url, CHAT, body)
    assert (status, cache, data["choices"][0]["message"]["content"]) == (200, "hit-exact", "no cap at all")
    status, cache, data = await post(http, url, CHAT, {**body, "max_tokens": 321})
    assert (status, cache, data["choices"][0]["message"]["content"]) == (200, "hit-exact", "capped at 321")
    assert calls(fake, "chat") == 2


# ---- 2. coalesced waiters are hits in /admin/cache/stats ----------------------------------------


async def test_coalesced_waiters_count_as_hits_in_cache_stats(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession, store_config: dict[str, Any]
) -> None:
    """N identical requests at once: one leader goes upstream (a miss), the N-1 others wait for
    its answer and are served it (hits). The team's /admin/cache/stats agree with the metrics."""
    n = 6
    body = {"model": "gpt-test", "messages": MSGS, "temperature": 0}
    async with running_gateway(gateway_config(fake.base_url, **store_config)) as url:
        admin = AdminClient(http, url, keys.admin)
        await admin.create_team(id="coal", name="coal")
        k = await admin.create_key(team_id="coal")
        m = await metrics_text(http, url)
        hits0 = metric_value(m, "tollway_cache_hits_total", kind="exact")
        misses0 = metric_value(m, "tollway_cache_misses_total", kind="exact")

        fake.enqueue(Behaviour(content="one answer for all", delay_s=0.5))
        results = await asyncio.gather(*(post(http, url, CHAT, body, k["key"]) for _ in range(n)))
        assert [r[0] for r in results] == [200] * n
        assert {r[2]["choices"][0]["message"]["content"] for r in results} == {"one answer for all"}
        assert sorted(r[1] for r in results) == ["hit-exact"] * (n - 1) + ["miss"]
        assert calls(fake, "chat") == 1

        stats = (await admin.ok("GET", "/admin/cache/stats?team_id=coal"))["teams"]["coal"]
        got = (stats["hits"], stats["exact_hits"], stats["misses"], stats["semantic_hits"])
        assert got == (n - 1, n - 1, 1, 0), stats
        m = await metrics_text(http, url)
        assert metric_value(m, "tollway_cache_hits_total", kind="exact") - hits0 == n - 1
        assert metric_value(m, "tollway_cache_misses_total", kind="exact") - misses0 == 1


async def test_many_identical_requests_at_once_make_one_upstream_call(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession, store_config: dict[str, Any]
) -> None:
    """The leader of a key registers itself before anything can yield (on Redis, counting the
    lookup is a round trip): 40 identical requests at once, in several rounds, make one upstream
    call per round."""
    n, rounds = 40, 5
    async with running_gateway(gateway_config(fake.base_url, **store_config)) as url:
        admin = AdminClient(http, url, keys.admin)
        await admin.create_team(id="herd", name="herd")
        k = await admin.create_key(team_id="herd")
        for i in range(rounds):
            body = {"model": "gpt-test", "messages": [{"role": "user", "content": f"herd {i}"}],
                    "temperature": 0}
            fake.enqueue(Behaviour(content=f"answer {i}", delay_s=0.3))
            results = await asyncio.gather(*(post(http, url, CHAT, body, k["key"]) for _ in range(n)))
            assert [r[0] for r in results] == [200] * n
            assert {r[2]["choices"][0]["message"]["content"] for r in results} == {f"answer {i}"}
            assert sorted(r[1] for r in results).count("miss") == 1, [r[1] for r in results]
            assert calls(fake, "chat") == i + 1


# ---- 3. /v1/completions with max_tokens 0 -------------------------------------------------------


async def test_completions_max_tokens_zero_is_forwarded_and_keyed_apart(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    """`max_tokens: 0` (with `echo`) asks for the prompt's logprobs only: it is a cap, sent
    upstream as it is (not replaced by the model's default cap), and not the question of the
    same prompt without max_tokens (which the gateway sends with that default cap)."""
    gateway = await start_gateway(models={"instruct-test": {"max_output_tokens": 77}})
    admin = AdminClient(http, gateway, keys.admin)
    zero = {"model": "instruct-test", "prompt": "Tell a story", "temperature": 0, "echo": True,
            "logprobs": 1, "max_tokens": 0}
    uncapped = {k: v for k, v in zero.items() if k != "max_tokens"}
    fake.enqueue(Behaviour(content="Tell a story"), Behaviour(content="Tell a story once upon a time"))

    status, cache, data = await post(http, gateway, COMPLETIONS, zero, keys.team_a)
    assert (status, cache, data["choices"][0]["text"]) == (200, "miss", "Tell a story")
    assert fake.requests[-1].body["max_tokens"] == 0, fake.requests[-1].body
    await wait_for_cache_entries(admin, "team-a", 1)

    status, cache, data = await post(http, gateway, COMPLETIONS, uncapped, keys.team_a)
    assert (status, cache, data["choices"][0]["text"]) == (200, "miss", "Tell a story once upon a time")
    assert fake.requests[-1].body["max_tokens"] == 77  # the model's max_output_tokens
    assert calls(fake, "completions") == 2
    await wait_for_cache_entries(admin, "team-a", 2)

    status, cache, data = await post(http, gateway, COMPLETIONS, zero, keys.team_a)
    assert (status, cache, data["choices"][0]["text"]) == (200, "hit-exact", "Tell a story")
    assert calls(fake, "completions") == 2
