"""RedisServer: a throwaway `redis-server` on a free loopback port, for tests and the bench.

    with RedisServer() as srv:            # or `async with`
        store = RedisStore(srv.url)
        srv.stop(); srv.start()           # same port: clients must reconnect by themselves

No persistence (`--save "" --appendonly no`), its own temporary directory, stopped by PID.
A missing `redis-server` binary is an error, never a silent skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

_READY_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(
        self,
        port: int | None = None,
        directory: str | Path | None = None,
        executable: str = "redis-server",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = port
        self._fixed_port = port is not None
        self._dir = Path(directory) if directory is not None else None
        self._own_dir = directory is None
        self._executable = executable
        self._extra = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start (or start again, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        exe = shutil.which(self._executable)
        if exe is None:
            raise RuntimeError(
                f"{self._executable!r} is not on PATH: install Redis (e.g. apt-get install redis-server)"
            )
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="tollway-redis-"))
        for _ in range(5):
            if self.port is None:
                self.port = free_port()
            if self._spawn(exe):
                return self
            if self._fixed_port:
                break
            self.port = None  # lost a race for the port: pick another
        raise RuntimeError(f"redis-server did not start on port {self.port}: {self._log_tail()}")

    def _spawn(self, exe: str) -> bool:
        assert self._dir is not None and self.port is not None
        self._log = open(self._dir / f"redis-{self.port}.log", "ab")  # closed in _reap()
        self._proc = subprocess.Popen(
            [
                exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self._dir), "--daemonize", "no",
                *self._extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                return False
            if _answers_ping(self.port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) by its PID."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self) -> str:
        if self._dir is None or self.port is None:
            return ""
        path = self._dir / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    # ---- context managers --------------------------------------------------------------------

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> RedisServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.cleanup)
