"""Tollway benchmark driver: ``python -m bench [--quick]``.

Starts the fast fake upstream (``bench.fast_upstream``) and the gateway
(``python -m gateway serve`` with a generated config) as child processes, then runs each
scenario first straight at the upstream ("direct") and then through Tollway, with the
closed-loop load generator (``bench.loadgen``) in this process. Prints one markdown table
on stdout; progress and diagnostics go to stderr. Both children are stopped by PID at the
end, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import uvloop
import yaml

from bench import procs
from bench.loadgen import build_request, run_load
from bench.report import Row, Scenario, render_table

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLIENT_KEY = "sk-tw-bench-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-bench-0123456789"
CHAT_PATH = "/v1/chat/completions"
BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the benchmark"}],'
    b'"max_tokens":32}'
)
STREAM_BODY = BODY[:-1] + b',"stream":true}'

FULL = [
    Scenario("chat c=1", 1, 2000, False),
    Scenario("chat c=16", 16, 10000, False),
    Scenario("chat c=64", 64, 10000, False),
    Scenario("stream c=16", 16, 800, True),
]
QUICK = [
    Scenario("chat c=1", 1, 200, False),
    Scenario("chat c=16", 16, 1000, False),
    Scenario("chat c=64", 64, 1000, False),
    Scenario("stream c=16", 16, 80, True),
]


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


def gateway_config(port: int, upstream_port: int, extra: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"host": HOST, "port": port},
        "auth": {"mode": "keys", "keys": [{"key": "${TOLLWAY_BENCH_KEY}", "team": "bench"}]},
        "providers": {
            "up": {
                "kind": "openai_compatible",
                "api_base": f"http://{HOST}:{upstream_port}/v1",
                "api_key": "${TOLLWAY_BENCH_UPSTREAM_KEY}",
            }
        },
        "models": {"bench-model": {"deployments": [{"provider": "up", "model": "upstream-model"}]}},
    }
    return _merge(cfg, extra)


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


def check_target(name: str, port: int, key: str | None, notes: list[str]) -> bool:
    """Send one plain and one streaming request and say clearly what is wrong, if anything."""
    ok = True
    status, headers, body = probe(port, BODY, key)
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
    if name == "tollway":
        if "x-tollway-overhead-ms" not in headers:
            notes.append("tollway: response has no x-tollway-overhead-ms header")
        if not isinstance(obj, dict) or not obj.get("usage"):
            notes.append("tollway: non-streaming response has no usage")
    status, headers, body = probe(port, STREAM_BODY, key)
    events = [ln for ln in body.split(b"\n") if ln.startswith(b"data:")]
    if status != 200 or not events or events[-1].strip() != b"data: [DONE]":
        log(f"[{name}] streaming probe: HTTP {status}, {len(events)} events: {body[:500]!r}")
        ok = False
    elif name == "tollway":
        ctype = headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            notes.append(f"tollway: streaming content-type is {ctype!r}")
        log(f"[{name}] streaming probe: {len(events)} data events (direct sends 21)")
    return ok


def _cpu_or_none(child: procs.Child | None) -> procs.CpuSample | None:
    return procs.tree_cpu(child.pid) if child is not None and child.alive() else None


async def measure(
    scenario: Scenario,
    target: str,
    port: int,
    key: str | None,
    upstream: procs.Child,
    gateway: procs.Child | None,
) -> Row:
    """Warm up, then run the scenario's bounded request count with CPU probes around it."""
    body = STREAM_BODY if scenario.stream else BODY
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = build_request("POST", HOST, port, CHAT_PATH, body, headers)
    timeout_s = 30.0
    warm = await run_load(
        HOST,
        port,
        request,
        total=scenario.warmup,
        concurrency=scenario.concurrency,
        stream=scenario.stream,
        timeout_s=timeout_s,
    )
    if warm.error_count:
        log(f"  warmup errors: {dict(warm.errors)}")
    await asyncio.sleep(0.2)  # let the other processes settle before the probes
    gw0 = _cpu_or_none(gateway)
    up0 = procs.tree_cpu(upstream.pid)
    gc.collect()
    gc.disable()  # no collector pauses in the load generator while measuring
    try:
        lg0 = procs.self_cpu_s()
        result = await run_load(
            HOST,
            port,
            request,
            total=scenario.requests,
            concurrency=scenario.concurrency,
            stream=scenario.stream,
            timeout_s=timeout_s,
        )
        lg1 = procs.self_cpu_s()
    finally:
        gc.enable()
    up1 = procs.tree_cpu(upstream.pid)
    gw1 = _cpu_or_none(gateway)
    row = Row(
        scenario=scenario,
        target=target,
        result=result,
        upstream_cpu_s=up1 - up0,
        loadgen_cpu_s=lg1 - lg0,
    )
    if gateway is not None:
        row.gateway_cpu_s = gw1 - gw0 if gw0 is not None and gw1 is not None else None
        row.gateway_rss_mb = procs.tree_rss_mb(gateway.pid) if gateway.alive() else None
    log(
        f"  {scenario.name:<12} {target:<8} {result.rps:8.0f} req/s, "
        f"errors {result.error_count}" + (f" {dict(result.errors)}" if result.errors else "")
    )
    return row


async def run_all(
    scenarios: list[Scenario],
    upstream: procs.Child,
    upstream_port: int,
    gateway: procs.Child | None,
    gateway_port: int,
    notes: list[str],
) -> list[Row]:
    rows: list[Row] = []
    for sc in scenarios:
        log(f"scenario {sc.name} ({sc.requests} requests, {sc.warmup} warmup)")
        rows.append(await measure(sc, "direct", upstream_port, None, upstream, None))
        if gateway is None:
            continue
        if not gateway.alive():
            notes.append(f"gateway exited (code {gateway.proc.returncode}) before {sc.name}")
            log(f"gateway is gone (exit code {gateway.proc.returncode}):\n{gateway.log_tail()}")
            gateway = None
            continue
        rows.append(await measure(sc, "tollway", gateway_port, CLIENT_KEY, upstream, gateway))
    return rows


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
        notes.append(f"gateway log: {summary} (see {child.log_path})")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 10x fewer requests")
    parser.add_argument(
        "--config-extra", type=Path, help="YAML deep-merged into the generated gateway config"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all request counts")
    parser.add_argument("--direct-only", action="store_true", help="do not start the gateway")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    args = parser.parse_args(argv)
    extra: dict[str, Any] = {}
    if args.config_extra is not None:
        loaded = yaml.safe_load(args.config_extra.read_text())
        if not isinstance(loaded, dict):
            parser.error("--config-extra must hold a YAML mapping")
        extra = loaded

    signal.signal(signal.SIGTERM, _raise_interrupt)
    if not 0 < args.scale <= 100:
        parser.error("--scale must be in (0, 100]")
    scenarios = [
        dataclasses.replace(sc, requests=max(sc.concurrency, round(sc.requests * args.scale)))
        for sc in (QUICK if args.quick else FULL)
    ]
    tmp = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    keep = args.keep_logs
    notes: list[str] = []
    upstream: procs.Child | None = None
    gateway: procs.Child | None = None
    try:
        upstream, upstream_port = procs.start_upstream(ROOT, tmp / "upstream.log")
        log(f"fake upstream pid {upstream.pid} on port {upstream_port}")
        if not check_target("direct", upstream_port, None, notes):
            log("the fake upstream failed its probe; giving up")
            keep = True
            return 1
        gateway_port = 0
        if not args.direct_only:
            gateway_port = free_port()
            cfg_path = tmp / "tollway-bench.yaml"
            cfg_path.write_text(
                yaml.safe_dump(gateway_config(gateway_port, upstream_port, extra), sort_keys=False)
            )
            env = dict(os.environ)
            env["TOLLWAY_BENCH_KEY"] = CLIENT_KEY
            env["TOLLWAY_BENCH_UPSTREAM_KEY"] = UPSTREAM_KEY
            gateway = procs.start_gateway(ROOT, cfg_path, env, tmp / "gateway.log")
            log(f"gateway pid {gateway.pid} on port {gateway_port}, config {cfg_path}")
            try:
                procs.wait_ready(gateway, f"http://{HOST}:{gateway_port}/ready", 20.0)
                if not check_target("tollway", gateway_port, CLIENT_KEY, notes):
                    raise RuntimeError("the gateway failed its probe requests")
            except RuntimeError as e:
                log(f"gateway unusable, measuring direct only: {e}")
                lines = str(e).splitlines()
                notes.append("gateway not measured: " + "\n  ".join(lines[:1] + lines[1:][-6:]))
                gateway.stop()
                keep = True
                gateway = None
        rows = uvloop.run(run_all(scenarios, upstream, upstream_port, gateway, gateway_port, notes))
        if gateway is not None:
            if not gateway.alive() and not any(n.startswith("gateway exited") for n in notes):
                notes.append(f"gateway exited with code {gateway.proc.returncode} during the run")
                keep = True
            _scan_log(gateway, notes)
        errors = sum(r.result.error_count for r in rows)
        print(
            f"Tollway bench {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
            f"{' (quick)' if args.quick else ''}"
            f"{f' (scale {args.scale:g})' if args.scale != 1 else ''}"
            "; latencies in ms, CPU per request in ms\n"
        )
        print(render_table(rows))
        for r in rows:
            if r.result.errors:
                print(f"\n- {r.scenario.name} / {r.target} errors: {dict(r.result.errors)}")
        for n in notes:
            print(f"\n- note: {n}")
        if errors:
            keep = True
        gateway_failed = not args.direct_only and (gateway is None or not gateway.alive())
        return 1 if errors or gateway_failed else 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for child in (gateway, upstream):
            if child is not None:
                code = child.stop()
                log(f"stopped {child.name} (pid {child.pid}, exit code {code})")
        if keep:
            log(f"logs kept in {tmp}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
