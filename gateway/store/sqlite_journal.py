"""SqliteJournal: the embedded store's durable copy in one SQLite file (WAL, synchronous=NORMAL).

Blocking by design: every method is called on the embedded store's single SQLite thread, never
on the event loop. Spend counters are stored as deltas added on conflict, so a flush never
overwrites what an earlier run of the process wrote.
"""

from __future__ import annotations

import fcntl
import itertools
import sqlite3
from pathlib import Path
from typing import IO, Any

from gateway.store import codec
from gateway.store.base import KeyRecord, SpendRecord, TeamRecord, period_bounds
from gateway.store.rules import RawSpend, day_str

_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL, key_hash TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend (
    scope TEXT NOT NULL, pid TEXT NOT NULL, period TEXT NOT NULL, start INTEGER NOT NULL,
    nano INTEGER NOT NULL, PRIMARY KEY (scope, pid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_period_start ON spend (period, start);
CREATE TABLE IF NOT EXISTS ledger (
    ts REAL NOT NULL, day TEXT NOT NULL, request_id TEXT, team_id TEXT, key_id TEXT, model TEXT,
    provider TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER,
    cost_nano INTEGER, cache TEXT, latency_ms REAL, status INTEGER);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, expires_at REAL);
"""

_LEDGER_INSERT = (
    "INSERT INTO ledger (ts, day, request_id, team_id, key_id, model, provider, prompt_tokens,"
    " completion_tokens, cached_tokens, cost_nano, cache, latency_ms, status) VALUES "
)
_LEDGER_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_LEDGER_ROWS_PER_INSERT = 256
"""256 rows x 14 columns stays far below SQLite's limit of 32766 parameters per statement."""

Loaded = tuple[list[TeamRecord], list[KeyRecord], dict[tuple[str, str], int], dict[str, float | None]]


class StoreLocked(Exception):
    """Another process holds this embedded store."""


class SqliteJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock: IO[bytes] | None = None

    def open(self, since: float, now: float) -> Loaded:
        """Open (creating the directory and tables) and load teams, keys, the spend of periods
        that had not ended at `since`, and set_once flags still alive at `now`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One process per embedded store: a second one would keep its own counters and both
        # would overwrite each other's spend. (Use the redis backend for several processes.)
        lock = open(str(self.path) + ".lock", "wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreLocked(
                f"the embedded store {self.path} is in use by another process; "
                "run one process per embedded store, or use the redis backend"
            ) from None
        self._lock = lock
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        self._conn = conn
        teams = [codec.load_team(doc) for (doc,) in conn.execute("SELECT doc FROM teams")]
        keys = [codec.load_key(doc) for (doc,) in conn.execute("SELECT doc FROM keys")]
        cut = {p[0]: int(period_bounds(p, since)[0]) for p in ("daily", "weekly", "monthly")}
        rows = conn.execute(
            "SELECT scope, pid, nano FROM spend WHERE period = 't' OR (period = 'd' AND start >= ?)"
            " OR (period = 'w' AND start >= ?) OR (period = 'm' AND start >= ?)",
            (cut["d"], cut["w"], cut["m"]),
        )
        spend = {(scope, pid): nano for scope, pid, nano in rows}
        kv = dict(
            conn.execute("SELECT key, expires_at FROM kv WHERE expires_at IS NULL OR expires_at > ?", (now,))
        )
        return teams, keys, spend, kv

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the SQLite journal is not open")
        return self._conn

    def _exec(self, sql: str, params: tuple[Any, ...]) -> None:
        conn = self._db()
        with conn:
            conn.execute(sql, params)

    def put_team(self, team_id: str, doc: str) -> None:
        self._exec("INSERT OR REPLACE INTO teams (id, doc) VALUES (?, ?)", (team_id, doc))

    def put_key(self, key: KeyRecord, doc: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO keys (id, team_id, key_hash, doc) VALUES (?, ?, ?, ?)",
            (key.id, key.team_id, key.key_hash, doc),
        )

    def put_flag(self, key: str, expires_at: float | None) -> None:
        self._exec("INSERT OR REPLACE INTO kv (key, expires_at) VALUES (?, ?)", (key, expires_at))

    def flush(self, spend: dict[tuple[str, str], int], ledger: list[SpendRecord]) -> None:
        """Add spend deltas and append ledger rows, in one transaction."""
        conn = self._db()
        with conn:
            conn.executemany(
                "INSERT INTO spend (scope, pid, period, start, nano) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (scope, pid) DO UPDATE SET nano = nano + excluded.nano",
                [(scope, pid, pid[0], int(pid[1:]), nano) for (scope, pid), nano in spend.items()],
            )
            rows = [
                (r.ts, day_str(r.ts), r.request_id, r.team_id, r.key_id, r.model, r.provider,
                 r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.cost_nano, r.cache,
                 r.latency_ms, r.status)
                for r in ledger
            ]
            # Many rows per statement: sqlite3 releases and retakes the GIL around every step, so
            # one step per row would hand the GIL back and forth with the event loop per record.
            for i in range(0, len(rows), _LEDGER_ROWS_PER_INSERT):
                chunk = rows[i : i + _LEDGER_ROWS_PER_INSERT]
                conn.execute(
                    _LEDGER_INSERT + ",".join([_LEDGER_ROW] * len(chunk)),
                    list(itertools.chain.from_iterable(chunk)),
                )

    def query_spend(self, lo: float, hi: float, team_id: str | None) -> list[RawSpend]:
        sql = (
            "SELECT team_id, key_id, model, day, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"
            " SUM(cost_nano) FROM ledger WHERE ts >= ? AND ts < ?"
        )
        params: tuple[Any, ...] = (lo, hi)
        if team_id is not None:
            sql += " AND team_id = ?"
            params += (team_id,)
        sql += " GROUP BY team_id, key_id, model, day"
        return [
            (t, k, m, d, int(n), int(pt), int(ct), int(c))
            for t, k, m, d, n, pt, ct, c in self._db().execute(sql, params)
        ]
