"""Small assertion helpers shared by the tests (imported as `helpers`)."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

StartGateway = Callable[..., Awaitable[str]]
"""`await start_gateway(**config_overrides)` -> the gateway URL."""

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



from gateway.testing.fake_upstream import DEFAULT_REPLY, tokenize  # noqa: E402

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
