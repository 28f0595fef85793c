"""GatewayProcess: the real `python -m gateway serve` in a subprocess, for tests and the bench.

    config = gateway_config(fake.base_url, store={"backend": "redis", "url": srv.url})
    with GatewayProcess(config) as gw:              # or `async with` / `await gw.astart()`
        ...  # talk to gw.url over HTTP
        gw.kill()                                   # SIGKILL, as in a crash
        gw.start()                                  # again, same config file, same port

The config dict is written as YAML to the process's own temporary directory; the process gets
`--config FILE --port PORT` (a free loopback port, kept across restarts), the `TOLLWAY_TEST_*`
environment (see `gateway.testing.harness.install_test_env`) plus any `env` given, and writes
stdout and stderr to a log file there (`logs()`; shown in the error when it fails to start).
`start()` returns once `GET /ready` answers 200, or raises within `ready_timeout_s`. Every
stop is by PID: `terminate()` (SIGTERM and wait, SIGKILL if it will not stop), `kill()`
(SIGKILL), `stop()` (terminate if still running; the finalizer to use in fixtures).

The sync methods block; in async tests use the `a*` variants (they run in a thread), so that
anything else on the test's event loop — a fake upstream, say — keeps running meanwhile.

`AdminClient` is a thin async client of a gateway's admin API (teams, keys, budgets, spend)
that returns parsed JSON and fails loudly on an unexpected status.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
import yaml

from gateway.testing.harness import install_test_env
from gateway.testing.redis_server import free_port

__all__ = ["AdminClient", "AdminError", "GatewayProcess", "GatewayStartError"]

_POLL_S = 0.05
_PORT_ATTEMPTS = 3


class GatewayStartError(RuntimeError):
    """The gateway process exited or did not become ready in time; the message has its log."""


def _http_status(url: str, timeout_s: float) -> int | None:
    """The HTTP status of GET url, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


class GatewayProcess:
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        directory: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        name: str = "gateway",
        ready_timeout_s: float = 20.0,
        ready_path: str = "/ready",
    ) -> None:
        self.name = name
        self.config: dict[str, Any] = dict(config)
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else Path(
            tempfile.mkdtemp(prefix=f"tollway-{name}-")
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / "config.yaml"
        self.log_path = self.directory / f"{name}.log"
        self._env = dict(env or {})
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.ready_timeout_s = ready_timeout_s
        self.ready_path = ready_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.returncode: int | None = None
        """The exit status of the last run that ended (negative: killed by that signal)."""
        self.starts = 0

    # ---- properties --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (append `/v1` for an OpenAI base URL)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle ---------------------------------------------------------------------------

    def write_config(self) -> Path:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        return self.config_path

    def start(self) -> GatewayProcess:
        """Start (or start again after a stop, on the same port and config) and wait for ready."""
        if self.running:
            return self
        self.write_config()
        last = ""
        for _ in range(_PORT_ATTEMPTS):
            ok, last = self._spawn_and_wait()
            if ok:
                return self
            if self._fixed_port or "address already in use" not in last.lower():
                break
            self.port = free_port()  # lost a race for the port: take another
        raise GatewayStartError(f"{self.name} did not become ready: {last}\n--- log ---\n{self.logs()}")

    def _spawn_and_wait(self) -> tuple[bool, str]:
        install_test_env()
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1"}
        self.starts += 1
        self._log = open(self.log_path, "ab")  # closed in _reap()
        self._log.write(f"\n=== start {self.starts}: port {self.port} ===\n".encode())
        self._log.flush()
        self.returncode = None
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
             "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.directory,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        url = self.url + self.ready_path
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                return False, f"exited with status {code} before it was ready"
            if _http_status(url, 0.5) == 200:
                return True, ""
            time.sleep(_POLL_S)
        self.kill()
        return False, f"GET {self.ready_path} did not answer 200 within {self.ready_timeout_s:.0f} s"

    def terminate(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (a graceful stop) and wait; SIGKILL if it has not exited after timeout_s.
        Returns the exit status (None if it was not running)."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self.returncode = proc.returncode
        self._reap()
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL, as in a crash (nothing is flushed). Returns the exit status."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.returncode = proc.returncode
        self._reap()
        return self.returncode

    def stop(self) -> None:
        """The finalizer: a graceful stop if still running (SIGKILL after 10 s)."""
        self.terminate(timeout_s=10.0)

    def cleanup(self) -> None:
        """Stop and remove the temporary directory (when this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # ---- logs --------------------------------------------------------------------------------

    def logs(self, tail_chars: int = 8000) -> str:
        """The tail of everything the process (all its runs) wrote to stdout and stderr."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-tail_chars:]

    # ---- async variants (run the blocking calls in a thread) ---------------------------------

    async def astart(self) -> GatewayProcess:
        return await asyncio.to_thread(self.start)

    async def aterminate(self, timeout_s: float = 15.0) -> int | None:
        return await asyncio.to_thread(self.terminate, timeout_s)

    async def akill(self) -> int | None:
        return await asyncio.to_thread(self.kill)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    # ---- context managers --------------------------------------------------------------------

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> GatewayProcess:
        return await self.astart()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.cleanup)


# ---- the admin API -------------------------------------------------------------------------------


class AdminError(AssertionError):
    """The admin API answered a status other than the one expected."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class AdminClient:
    """`await admin.create_team(id="t1", budget={"limit_usd": 5})` and so on; every method
    returns the parsed JSON answer. `base_url` is the gateway's URL without `/v1`."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, admin_key: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"}

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        expect: int = 200,
    ) -> Any:
        async with self.session.request(
            method, self.base_url + path, json=json, params=params, headers=self.headers
        ) as r:
            text = await r.text()
            if r.status != expect:
                raise AdminError(method, path, r.status, text)
            return await r.json(content_type=None)

    async def create_team(self, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = await self.call("POST", "/admin/teams", json=fields, expect=201)
        return out

    async def create_key(self, **fields: Any) -> dict[str, Any]:
        """The answer includes the secret as `key` (shown once)."""
        out: dict[str, Any] = await self.call("POST", "/admin/keys", json=fields, expect=201)
        return out

    async def get_team(self, team_id: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.call("GET", f"/admin/teams/{team_id}")
        return out

    async def get_key(self, key_id: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.call("GET", f"/admin/keys/{key_id}")
        return out

    async def budget(self, kind: str, scope_id: str) -> dict[str, Any]:
        """`kind` is "keys" or "teams"."""
        out: dict[str, Any] = await self.call("GET", f"/admin/{kind}/{scope_id}/budget")
        return out

    async def spend(self, **params: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.call("GET", "/admin/spend", params=params)
        return out

    async def wait_settled(self, kind: str, scope_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Poll the budget until nothing is reserved; return it (raise if it never settles)."""
        deadline = time.monotonic() + timeout_s
        while True:
            b = await self.budget(kind, scope_id)
            if b["reserved_usd"] == 0:
                return b
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{kind}/{scope_id}: reservations still held after {timeout_s} s: {b}"
                )
            await asyncio.sleep(0.05)

    async def wait_spend(
        self,
        done: Callable[[dict[str, Any]], bool],
        timeout_s: float = 10.0,
        **params: str,
    ) -> dict[str, Any]:
        """Poll `/admin/spend` (with `params`) until `done(answer)` (the ledger is written
        behind the requests) or the time is up; return the last answer either way."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = await self.spend(**params)
            if done(out) or time.monotonic() > deadline:
                return out
            await asyncio.sleep(0.05)
