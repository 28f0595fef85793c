"""Child processes for the benchmark (fake upstream, gateway) and /proc-based CPU/RSS probes.

Children are started in their own session (so a terminal Ctrl-C reaches only the bench,
which then stops them) and stopped strictly by PID: SIGTERM, a bounded wait, then SIGKILL.
CPU and RSS figures cover the child's whole process tree (in case the gateway runs
worker processes).
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime seconds) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2 :].split()
    # rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / _CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _read_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _tasks_runtime_s(pid: int) -> float:
    """Sum of the scheduler's exact on-CPU time (ns) over the live threads of ``pid``."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_bytes().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of a process tree, two ways: clock ticks (complete) and ns (precise)."""

    ticks_s: float
    """utime+stime from /proc/<pid>/stat: includes exited threads, 1/CLK_TCK resolution."""
    exact_s: float
    """Sum of /proc/<pid>/task/*/schedstat: nanoseconds, but only threads still alive."""

    def __sub__(self, before: CpuSample) -> float:
        """CPU seconds between two samples: precise unless threads exited in between."""
        ticks = self.ticks_s - before.ticks_s
        exact = self.exact_s - before.exact_s
        slack = 2.0 / _CLK_TCK + 0.02 * ticks
        return exact if exact > 0 and abs(exact - ticks) <= slack else ticks


def tree_cpu(pid: int) -> CpuSample:
    """CPU time used so far by ``pid`` and its live descendants."""
    ticks = exact = 0.0
    for p in process_tree(pid):
        st = _read_stat(p)
        if st is not None:
            ticks += st[1]
            exact += _tasks_runtime_s(p)
    return CpuSample(ticks, exact)


def tree_rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of ``pid`` and its live descendants, in MiB."""
    kib = 0
    for p in process_tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                kib += int(line.split()[1])
                break
    return kib / 1024


def self_cpu_s() -> float:
    """User+system CPU seconds of this process (microsecond resolution)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Child:
    """A started child process, with its log file (stderr and, after the handshake, stdout)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, max_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-max_lines:])

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM by PID, wait (bounded), then SIGKILL by PID. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def start_upstream(
    cwd: Path,
    log_path: Path,
    timeout_s: float = 10.0,
    args: Sequence[str] = (),
    name: str = "upstream",
    module: str = "bench.fast_upstream",
) -> tuple[Child, int]:
    """Start ``python -m <module> --port 0 [args]`` (``bench.fast_upstream`` or
    ``bench.fake_upstream_proc``) and read its port from its first stdout line."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    child = Child(name, proc, log_path)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = b""
    deadline = time.monotonic() + timeout_s
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError("fake upstream did not report its port in time")
            b = os.read(proc.stdout.fileno(), 64)
            if not b:
                raise RuntimeError(f"fake upstream exited early:\n{child.log_tail()}")
            line += b
        return child, int(line)
    except BaseException:
        child.stop()
        raise
    finally:
        sel.close()


def start_gateway(cwd: Path, config_path: Path, env: dict[str, str], log_path: Path) -> Child:
    """Start ``python -m gateway serve --config <file>`` with its output going to a log."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return Child("gateway", proc, log_path)


def wait_ready(child: Child, url: str, timeout_s: float = 20.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the child exits (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(
                f"{child.name} exited with code {child.proc.returncode} before it was ready"
                f"; last log lines:\n{child.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(
        f"{child.name} not ready at {url} after {timeout_s:.0f} s ({last}); "
        f"last log lines:\n{child.log_tail()}"
    )
