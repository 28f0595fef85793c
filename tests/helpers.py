"""Small assertion helpers shared by the tests (imported as `helpers`)."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.fake_upstream import DEFAULT_REPLY, FakeUpstream, tokenize
from gateway.testing.harness import gateway_config
from gateway.testing.processes import AdminClient as ProcessAdminClient
from gateway.testing.processes import GatewayProcess
from gateway.testing.redis_server import RedisServer

StartGateway = Callable[..., Awaitable[str]]
"""`await start_gateway(**config_overrides)` -> the gateway URL."""
StartRouted = Callable[..., Awaitable[str]]
"""`await start_routed(models, routing_cfg=..., providers=...)` -> the gateway URL."""

USER_MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def assert_error_shape(body: bytes | str, status: int | None = None) -> dict[str, Any]:
    """The body is an OpenAI error object with all four keys; return the inner object."""
    data = orjson.loads(body)
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), data
    err: dict[str, Any] = data["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    return err


def decode_b64_floats(s: str) -> list[float]:
    raw = base64.b64decode(s)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def sse_data_lines(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            out.append(line[5:].strip())
    return out


# ---- issue 3: admin API, budgets, limits (used by test_admin/test_limits/test_alerts) ----------


TEST_INPUT_USD_PER_TOKEN = 1e-6
TEST_OUTPUT_USD_PER_TOKEN = 2e-6
"""The harness prices every test model at $1 / $2 per million input / output tokens."""


def usd_cost(prompt_tokens: int, completion_tokens: int) -> float:
    """What a request costs on a harness-priced model."""
    return prompt_tokens * TEST_INPUT_USD_PER_TOKEN + completion_tokens * TEST_OUTPUT_USD_PER_TOKEN


def fake_usage(messages: list[Any], reply: str = DEFAULT_REPLY) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) the fake upstream reports for a one-choice chat request
    with plain-text `messages` answered with `reply`."""
    prompt = sum(max(1, len(str(m["content"]).split())) for m in messages)
    return prompt, len(tokenize(reply))


class AdminClient:
    """A thin raw-HTTP client of the admin API (statuses and bodies, nothing hidden)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, admin_key: str) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"}

    async def call(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, str]:
        """(status, parsed JSON or None, raw text)."""
        h = self.headers if headers is None else headers
        async with self.http.request(method, self.base + path, json=body, headers=h) as resp:
            text = await resp.text()
            try:
                data = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                data = None
            return resp.status, data, text

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, data, text = await self.call(method, path, body)
        assert got == status, (method, path, got, text)
        return data

    async def create_team(self, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = await self.ok("POST", "/admin/teams", fields, 201)
        return out

    async def create_key(self, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = await self.ok("POST", "/admin/keys", fields, 201)
        return out

    async def budget(self, kind: str, ident: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.ok("GET", f"/admin/{kind}s/{ident}/budget")
        return out

    async def spend(self, **query: str) -> dict[str, Any]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        out: dict[str, Any] = await self.ok("GET", "/admin/spend" + (f"?{qs}" if qs else ""))
        return out

    async def key_requests(self, key_id: str) -> int:
        """Ledger records of one key today (all models)."""
        rows = (await self.spend(group_by="key"))["rows"]
        return sum(int(r["requests"]) for r in rows if r["key_id"] == key_id)

    async def settled(self, key_id: str, requests: int, timeout_s: float = 3.0) -> tuple[dict[str, Any], int]:
        """Wait until the key holds no reservation and its ledger shows `requests` records;
        return (the key's budget, the ledger count) as last seen (the caller asserts)."""
        deadline = time.monotonic() + timeout_s
        while True:
            b = await self.budget("key", key_id)
            n = await self.key_requests(key_id)
            if (b["reserved_usd"] == 0 and n >= requests) or time.monotonic() > deadline:
                return b, n
            await asyncio.sleep(0.05)


async def metrics_text(http: aiohttp.ClientSession, base_url: str) -> str:
    async with http.get(base_url.rstrip("/") + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def metric_value(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples named `sample_name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def fixed_usage_reply(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A chat.completion whose usage is exactly these numbers (for exact cost assertions)."""
    return {
        "id": "chatcmpl-fixed",
        "object": "chat.completion",
        "created": 1_732_000_000,
        "model": "upstream-chat-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def nano(usd: float) -> int:
    return round(usd * 1_000_000_000)


class ThreadSpy:
    """Wraps a tokenizer: records the thread of every encode() call (to prove it ran off the loop)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.threads: list[threading.Thread] = []

    def encode(self, *args: Any, **kw: Any) -> Any:
        self.threads.append(threading.current_thread())
        return self.inner.encode(*args, **kw)


async def wait_for_cache_entries(admin: AdminClient, team: str, entries: int, timeout_s: float = 3.0) -> None:
    """Wait (bounded) until the team's partition holds `entries` entries: writes are off the response
    path, and a request that should find its answer before admission (not from the leader in
    flight) must come after the write."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        stats = await admin.ok("GET", f"/admin/cache/stats?team_id={team}")
        got = stats["teams"].get(team, {}).get("entries", 0)
        if got >= entries or loop.time() > deadline:
            assert got == entries, stats
            return
        await asyncio.sleep(0.02)


# ---- gateway processes with fixed-cost requests, on a real redis-server -------------------------
# (test_store_failure, test_access_gaps, test_restart, test_kill9_loss_bound; the `upstream` and
# `durable_redis` fixtures are in conftest.py)

PROMPT_TOKENS = 20
COMPLETION_TOKENS = 30
"""The usage every non-streaming answer of the `upstream` fixture reports."""
COST_NANO = PROMPT_TOKENS * 1_000 + COMPLETION_TOKENS * 2_000
"""The cost of one such request at the test models' price ($1 / $2 per million input / output tokens)."""
MAX_ANSWER_S = 3.0
"""A request while the store is down or stalled must be answered (refused or served) within this."""
RECOVERY_TIMEOUT_S = 10.0
"""How long the gateway may take to serve again (and to charge what it served) once the store is back."""


def chat_body(prompt: str) -> dict[str, Any]:
    """A billable chat request to gpt-test with one user message."""
    return {"model": "gpt-test", "messages": [{"role": "user", "content": prompt}], "max_tokens": 50}


def unique(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with a prompt nobody sent before (same token count: one word more)."""
    return {**body, "messages": [{"role": "user", "content": f"{body['messages'][0]['content']} "
                                                           f"{uuid.uuid4().hex}"}]}


def new_prefix() -> str:
    """A Redis key prefix of its own (gateways sharing it share a store)."""
    return f"tw-{uuid.uuid4().hex[:8]}:"


def redis_gateway_config(
    fake: FakeUpstream, srv: RedisServer, prefix: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """The test config in front of `fake`, with its store in `srv` under `prefix` (a new one by default)."""
    return gateway_config(
        fake.base_url,
        store={"backend": "redis", "url": srv.url, "prefix": prefix or new_prefix()},
        **overrides,
    )


async def start_redis_gateway(
    processes: Callable[..., GatewayProcess], fake: FakeUpstream, srv: RedisServer, **overrides: Any
) -> GatewayProcess:
    """A started gateway process (`gw-redis`) on `redis_gateway_config(fake, srv, **overrides)`."""
    return await processes(redis_gateway_config(fake, srv, **overrides), name="gw-redis").astart()


async def timed_chat(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]
) -> tuple[int, Any, float]:
    """(status, parsed body, seconds it took) of one chat request."""
    t0 = time.monotonic()
    async with session.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        data = await r.json(content_type=None)
        return r.status, data, time.monotonic() - t0


async def wait_for_200(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], *, fresh: bool = False
) -> tuple[int, Any, float]:
    """Retry a billable request (bounded by RECOVERY_TIMEOUT_S) until it succeeds; return the last
    answer. `fresh`: each attempt sends `unique(body)` instead of `body`."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        status, data, took = await timed_chat(session, url, key, unique(body) if fresh else body)
        if status == 200 or time.monotonic() > deadline:
            return status, data, took
        await asyncio.sleep(0.1)


def error_code(body: Any) -> Any:
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


def assert_store_unavailable(
    status: int, body: Any, seconds: float, *, says_unreachable: bool = False
) -> None:
    """A quick 503 `store_unavailable`; `says_unreachable`: its message says the store is unreachable."""
    assert seconds < MAX_ANSWER_S, f"took {seconds:.2f} s to answer while the store is down"
    assert status == 503, (status, body)
    assert error_code(body) == "store_unavailable", body
    if says_unreachable:
        msg = body["error"]["message"].lower()
        assert "store" in msg and "unreachable" in msg, body["error"]


async def budgeted_key(admin: ProcessAdminClient, name: str, team_name: str | None = None) -> dict[str, Any]:
    """A key with a $5 budget in a new team (`team of <name>` by default) with a $10 budget."""
    team = await admin.create_team(name=team_name or f"team of {name}", budget={"limit_usd": 10.0})
    return await admin.create_key(team_id=team["id"], name=name, budget={"limit_usd": 5.0})


async def wait_spent(
    admin: ProcessAdminClient, kind: str, scope_id: str, want_nano: int, timeout_s: float = RECOVERY_TIMEOUT_S
) -> dict[str, Any]:
    """Poll a settled budget (`kind` "keys" or "teams") until it has spent `want_nano` or the time
    is up; return it as last seen (the caller asserts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        b = await admin.wait_settled(kind, scope_id)
        if nano(b["spent_usd"]) >= want_nano or time.monotonic() > deadline:
            return b
        await asyncio.sleep(0.1)


# ---- the router's tests (test_routing, test_routing_gaps; `fakes` and `start_routed` in conftest.py) --

ROUTED_PROVIDERS = ("pa", "pb", "pc", "pd")
"""The providers of `start_routed`, pointing at `fakes[0..3]`."""
UPSTREAM_TIMEOUTS: dict[str, float] = {"connect_s": 1.0, "read_s": 5.0, "total_s": 10.0}

FAST_RETRY: dict[str, Any] = {
    "max_attempts": 3,
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.1,
    "max_retry_after_s": 2.0,
    "deadline_s": 10.0,
}
NO_BREAKER: dict[str, Any] = {"consecutive_failures": 20, "min_requests": 100}
"""Breakers that stay closed within one test (for tests about retries, not breakers)."""


def routing(retry: dict[str, Any] | None = None, breaker: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"retry": {**FAST_RETRY, **(retry or {})}, "breaker": {**NO_BREAKER, **(breaker or {})}}


def provider_config(kind: str, api_base: str) -> dict[str, Any]:
    """A provider section with the test upstream key and short timeouts."""
    return {
        "kind": kind,
        "api_base": api_base,
        "api_key": "${TOLLWAY_TEST_UPSTREAM_KEY}",
        "timeouts": dict(UPSTREAM_TIMEOUTS),
    }


def merge_providers(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`base` with each provider of `overrides` added, or updated key by key."""
    out = dict(base)
    for name, extra in (overrides or {}).items():
        out[name] = {**out.get(name, {}), **extra}
    return out
