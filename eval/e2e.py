"""End-to-end evaluation of the semantic cache: every labelled pair goes through a real gateway.

Unlike ``eval/evaluate.py`` (an in-process re-implementation of the matcher rules), this starts the
gateway itself (``python -m gateway serve`` via ``gateway.testing.processes.GatewayProcess``) with the
``exact_cache`` and ``semantic_cache`` plugins on the built-in ``mock`` provider, and measures what
production would serve: the ``x-tollway-cache`` header of the second request of each pair.

Per pair (``a`` = the cached conversation, ``b`` = the new request; label 1 = serving a's answer for b
is correct):

1. its own team and key (admin API): partitions are per team, so no pair can hit another's entries;
2. phase A, all pairs: send ``a`` (temperature 0, small max_tokens) -> expect ``miss``, then ``a`` again
   -> expect ``hit-exact`` (the answer is in the exact cache);
3. a bounded wait until the semantic index holds every ``a`` (indexing runs off the request path: the
   signal is ``plugins.semantic_cache.entries`` in ``GET /ready``, the same number as the gauge
   ``tollway_cache_semantic_index_entries``); since no ``b`` has been sent yet, the count is exactly
   the number of ``a`` vectors indexed;
4. phase B, all pairs: send ``b`` with the pair's key and record ``x-tollway-cache`` and
   ``x-tollway-cache-similarity``. Predicted hit = ``hit-semantic`` or ``hit-exact``. A hit must also
   serve a's answer (checked: the mock provider's answer is a function of the whole prompt).

Usage::

    python eval/e2e.py                                   # eval/semantic_pairs.jsonl, threshold 0.85
    python eval/e2e.py --pairs eval/holdout_pairs.jsonl --threshold 0.9 --json out.json
    python eval/e2e.py --limit 50 --concurrency 8
    python eval/e2e.py --ids paraphrase-001,number-001
    python eval/e2e.py --min-precision 0.98 --min-recall 0.5   # exit 1 when a target is missed

Exit status: 0, or 1 when ``--min-precision`` / ``--min-recall`` is missed, or 2 when the gateway
failed (did not start, the embedder did not load, or a request failed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import openai  # noqa: E402
from openai.types.chat import ChatCompletionMessageParam  # noqa: E402

from gateway.plugins.semantic_cache import last_user_text  # noqa: E402
from gateway.settings import SemanticCacheSettings  # noqa: E402
from gateway.testing.harness import deep_merge, gateway_config, install_test_env  # noqa: E402
from gateway.testing.processes import AdminClient, GatewayProcess, GatewayStartError  # noqa: E402


def _load_evaluate() -> ModuleType:
    """eval/evaluate.py, loaded by path (eval/ is not a package; "evaluate" alone could be another one)."""
    name = "tollway_eval_evaluate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("evaluate.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_ev = _load_evaluate()
load_pairs = _ev.load_pairs
message_text = _ev.message_text
fmt = _ev.fmt

Message = dict[str, Any]
Pair = dict[str, Any]

PAIRS = Path(__file__).with_name("semantic_pairs.jsonl")
MODEL = "mock-chat"
PLUGINS = [{"name": "metrics"}, {"name": "access"}, {"name": "exact_cache"}, {"name": "semantic_cache"}]
CACHE_HEADER = "x-tollway-cache"
SIM_HEADER = "x-tollway-cache-similarity"
HITS = frozenset({"hit-semantic", "hit-exact"})
MAX_TOKENS = 16
DEFAULT_THRESHOLD: float = SemanticCacheSettings().threshold

EMBEDDER_READY_S = 180.0
"""Bound on the wait for the embedding model to load (torch import + model, ~5-20 s)."""
SURELY_FITS = 254
"""A text of at most this many characters surely fits the embedding window (256 word pieces less [CLS]
and [SEP], at least one character each: `Embedder.fits`), so it is surely indexed."""
INDEX_WAIT_S = 60.0
"""Bound on the wait for the a-side vectors to be indexed."""
INDEX_STABLE_S = 2.0
"""Stop waiting early when the count has not moved for this long and only long prompts (that may not
fit the embedding window, so are exact-only) are missing."""


class GatewayFailure(RuntimeError):
    """The gateway did not start, its embedder did not load, or it failed a request."""


# ---- data ----------------------------------------------------------------------------------------


def select(pairs: Sequence[Pair], ids: Sequence[str] | None = None, limit: int | None = None) -> list[Pair]:
    """The pairs with the given ids (in that order), or the first `limit` pairs (all when None)."""
    if ids:
        by_id = {p["id"]: p for p in pairs}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise SystemExit(f"unknown pair ids: {', '.join(missing)}")
        return [by_id[i] for i in ids]
    return list(pairs if limit is None else pairs[:limit])


def last_text(messages: Sequence[Message]) -> str:
    """The last message's text (for the report)."""
    return message_text(messages[-1]) if messages else ""


@dataclass
class PairResult:
    id: str
    kind: str
    label: int
    team: str = ""
    a_first: str = ""
    """x-tollway-cache of the first a (expected: miss)."""
    a_again: str = ""
    """x-tollway-cache of the second a (expected: hit-exact)."""
    b_status: str = ""
    """x-tollway-cache of b: what is evaluated."""
    similarity: float | None = None
    served_a_answer: bool | None = None
    """On a hit: was b served exactly a's answer? (None on a miss.)"""
    same_context: bool = True
    """a and b differ only in their last message (else they are in different partitions: never a hit)."""
    error: str | None = None

    @property
    def hit(self) -> bool:
        return self.b_status in HITS


@dataclass
class Counts(_ev.Counts):
    """eval/evaluate.py's counts (precision, recall, false-hit rate), plus which cache answered."""

    hit_exact: int = 0
    hit_semantic: int = 0

    def add_result(self, r: PairResult) -> None:
        self.add(r.label, r.hit, r.id)
        if r.b_status == "hit-exact":
            self.hit_exact += 1
        elif r.b_status == "hit-semantic":
            self.hit_semantic += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "label_1": self.positives,
            "label_0": self.negatives,
            "predicted_hits": self.hits,
            "hit_exact": self.hit_exact,
            "hit_semantic": self.hit_semantic,
            "correct": self.correct,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "precision": self.precision(),
            "recall": self.recall(),
            "false_hit_rate": self.false_hit_rate(),
        }


@dataclass
class Report:
    pairs_file: str
    threshold: float
    results: list[PairResult]
    timings: dict[str, float] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)
    vetoes: dict[str, float] = field(default_factory=dict)
    """tollway_cache_semantic_vetoes_total per guard rule, over the whole run (a and b sides)."""
    veto_label_values: int = 0
    """Distinct values of that counter's `reason` label."""
    index_entries: dict[str, int] = field(default_factory=dict)
    code: dict[str, Any] = field(default_factory=dict)

    @property
    def scored(self) -> list[PairResult]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> list[PairResult]:
        return [r for r in self.results if r.error is not None]

    def totals(self) -> Counts:
        c = Counts()
        for r in self.scored:
            c.add_result(r)
        return c

    def per_kind(self) -> dict[str, Counts]:
        out: dict[str, Counts] = {}
        for r in self.scored:
            out.setdefault(r.kind, Counts()).add_result(r)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] != "paraphrase", kv[0])))

    def false_hits(self) -> list[PairResult]:
        return [r for r in self.scored if r.hit and not r.label]

    def false_misses_context_differs(self) -> int:
        """False misses whose earlier turns (or system prompt) differ: by design never a hit."""
        return sum(1 for r in self.scored if r.label and not r.hit and not r.same_context)

    def false_misses_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(r.kind for r in self.scored if r.label and not r.hit).items()))

    def to_json(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        by_id = {p["id"]: p for p in pairs}
        total = self.totals()
        return {
            "pairs_file": self.pairs_file,
            "threshold": self.threshold,
            "model": MODEL,
            "code": self.code,
            "n": total.n,
            "errors": len(self.errors),
            **{k: v for k, v in total.to_json().items() if k != "n"},
            "per_kind": {k: c.to_json() for k, c in self.per_kind().items()},
            "false_hits": [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "status": r.b_status,
                    "similarity": r.similarity,
                    "a": last_text(by_id[r.id]["a"]),
                    "b": last_text(by_id[r.id]["b"]),
                }
                for r in self.false_hits()
            ],
            "false_misses_by_kind": self.false_misses_by_kind(),
            "false_misses_context_differs": self.false_misses_context_differs(),
            "vetoes": self.vetoes,
            "veto_label_values": self.veto_label_values,
            "index_entries": self.index_entries,
            "anomalies": self.anomalies,
            "timings_s": self.timings,
            "results": [asdict(r) for r in self.results],
        }


def code_version() -> dict[str, Any]:
    """What gateway code was measured: git HEAD, the gateway files changed since, and a digest of the
    gateway package's Python sources as they are on disk (the gateway process imports those)."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    digest = hashlib.sha256()
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    changed = [line[3:] for line in git("status", "--porcelain", "--", "gateway").splitlines() if line]
    head = git("rev-parse", "--short", "HEAD")
    return {"git_head": head, "changed": changed, "sha256": digest.hexdigest()[:12]}


# ---- the gateway -----------------------------------------------------------------------------------


def e2e_config(threshold: float | None) -> dict[str, Any]:
    """The test config cut down to the mock provider, with both caches on.

    `threshold` None keeps the configured default (`cache.semantic.threshold`)."""
    config = gateway_config(
        "http://127.0.0.1:9/v1",  # no provider but `mock` is kept: never contacted
        plugins=PLUGINS,
        logging={"level": "WARNING"},
    )
    overrides: dict[str, Any] = {
        "providers": {name: None for name in config["providers"] if name != "mock"},
        "models": {name: None for name in config["models"] if name != MODEL},
    }
    if threshold is not None:
        overrides["cache"] = {"semantic": {"threshold": threshold}}
    return deep_merge(config, overrides)


async def semantic_state(http: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with http.get(base_url + "/ready") as r:
        body = await r.json(content_type=None)
    state: dict[str, Any] = body.get("plugins", {}).get("semantic_cache") or {}
    if not state:
        raise GatewayFailure(f"GET /ready shows no semantic_cache plugin: {body}")
    return state


async def wait_embedder(http: aiohttp.ClientSession, base_url: str, limit_s: float) -> float:
    """Wait (bounded) until the embedding model is loaded; returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        state = await semantic_state(http, base_url)
        if state.get("embedder") == "ready":
            return time.monotonic() - t0
        if state.get("embedder") == "failed":
            raise GatewayFailure(f"the semantic cache's embedder failed to load: {state}")
        if time.monotonic() - t0 > limit_s:
            raise GatewayFailure(f"the embedder was not ready after {limit_s:.0f} s: {state}")
        await asyncio.sleep(0.1)


async def wait_indexed(
    http: aiohttp.ClientSession, base_url: str, want: int, surely: int, limit_s: float
) -> int:
    """Wait (bounded) until the index holds `want` entries; stop early when it holds at least `surely`
    and has not changed for INDEX_STABLE_S. Returns the last count."""
    t0 = time.monotonic()
    last, since = -1, t0
    while True:
        n = int((await semantic_state(http, base_url)).get("entries", 0))
        now = time.monotonic()
        if n >= want:
            return n
        if n != last:
            last, since = n, now
        elif n >= surely and now - since >= INDEX_STABLE_S:
            return n
        if now - t0 > limit_s:
            return n
        await asyncio.sleep(0.05)


async def veto_counts(http: aiohttp.ClientSession, base_url: str) -> tuple[dict[str, float], int]:
    """tollway_cache_semantic_vetoes_total summed per guard rule (the `reason` label up to its first
    colon), and the number of distinct `reason` label values."""
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(base_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    reasons: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tollway_cache_semantic_vetoes_total":
                reason = s.labels.get("reason", "")
                reasons.add(reason)
                rule = reason.split(":", 1)[0].strip() or "-"
                out[rule] = out.get(rule, 0.0) + float(s.value)
    return dict(sorted(out.items())), len(reasons)


# ---- one pair ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: str
    similarity: float | None
    content: str


async def ask(client: openai.AsyncOpenAI, key: str, messages: Sequence[Message]) -> Answer:
    raw = await client.with_options(api_key=key).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=cast(list[ChatCompletionMessageParam], list(messages)),
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    completion = raw.parse()
    sim = raw.headers.get(SIM_HEADER)
    return Answer(
        status=raw.headers.get(CACHE_HEADER, ""),
        similarity=float(sim) if sim is not None else None,
        content=completion.choices[0].message.content or "" if completion.choices else "",
    )


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


# ---- the run -----------------------------------------------------------------------------------------


async def evaluate_e2e(
    pairs: Sequence[Pair],
    *,
    threshold: float | None = None,
    concurrency: int = 8,
    pairs_file: str = "",
    log: bool = True,
) -> Report:
    """Start a gateway, run every pair through it, stop it; the report of what it served."""

    def say(msg: str) -> None:
        if log:
            print(msg, file=sys.stderr, flush=True)

    keys = install_test_env()
    report = Report(
        pairs_file=pairs_file,
        threshold=threshold if threshold is not None else DEFAULT_THRESHOLD,
        results=[
            PairResult(
                id=p["id"], kind=p["kind"], label=int(p["label"]), same_context=p["a"][:-1] == p["b"][:-1]
            )
            for p in pairs
        ],
    )
    report.code = code_version()
    t_all = time.monotonic()
    config = e2e_config(threshold)
    gw = GatewayProcess(config, name="e2e-gateway", ready_timeout_s=60.0)
    # the embedded store in the process's own directory (removed by cleanup), not the harness's temp dir
    shutil.rmtree(Path(config["store"]["path"]).parent, ignore_errors=True)
    gw.config["store"] = {**config["store"], "path": str(gw.directory / "store.db")}
    try:
        try:
            t0 = time.monotonic()
            await gw.astart()
            report.timings["gateway_start_s"] = time.monotonic() - t0
        except GatewayStartError as e:
            raise GatewayFailure(str(e)) from e
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            report.timings["embedder_wait_s"] = await wait_embedder(http, gw.url, EMBEDDER_READY_S)
            say(f"gateway {gw.url} ready (pid {gw.pid}); {len(pairs)} pairs, concurrency {concurrency}")
            await _run_pairs(http, gw, keys.admin, pairs, report, concurrency, say)
            report.vetoes, report.veto_label_values = await veto_counts(http, gw.url)
        failed = report.errors
        if failed:
            first = failed[0]
            raise GatewayFailure(
                f"{len(failed)} of {len(pairs)} pairs failed; first {first.id}: {first.error}"
                f"\n--- gateway log ---\n{gw.logs(4000)}"
            )
        report.timings["total_s"] = time.monotonic() - t_all
        return report
    finally:
        await asyncio.to_thread(gw.cleanup)


async def _run_pairs(
    http: aiohttp.ClientSession,
    gw: GatewayProcess,
    admin_key: str,
    pairs: Sequence[Pair],
    report: Report,
    concurrency: int,
    say: Callable[[str], None],
) -> None:
    admin = AdminClient(http, gw.url, admin_key)
    sem = asyncio.Semaphore(max(1, concurrency))
    run_id = secrets.token_hex(3)
    results = report.results
    secrets_by_pair: list[str] = [""] * len(pairs)
    answers_a: list[str] = [""] * len(pairs)

    async def setup(i: int) -> None:
        async with sem:
            team = f"e2e-{run_id}-{i:05d}"
            try:
                await admin.create_team(id=team, name=f"e2e {pairs[i]['id']}"[:200])
                created = await admin.create_key(team_id=team, name=str(pairs[i]["id"])[:200])
            except Exception as e:
                results[i].error = f"admin: {_err(e)}"
                return
            results[i].team = team
            secrets_by_pair[i] = str(created["key"])

    async def phase_a(i: int) -> None:
        if results[i].error is not None:
            return
        async with sem:
            try:
                first = await ask(client, secrets_by_pair[i], pairs[i]["a"])
                again = await ask(client, secrets_by_pair[i], pairs[i]["a"])
            except Exception as e:
                results[i].error = f"a: {_err(e)}"
                return
        results[i].a_first, results[i].a_again = first.status, again.status
        answers_a[i] = first.content
        if first.status != "miss":
            report.anomalies.append(f"{pairs[i]['id']}: first a answered {first.status!r}, not 'miss'")
        if again.status != "hit-exact":
            report.anomalies.append(f"{pairs[i]['id']}: second a answered {again.status!r}, not 'hit-exact'")
        elif again.content != first.content:
            report.anomalies.append(f"{pairs[i]['id']}: the exact hit on a served another answer")

    async def phase_b(i: int) -> None:
        if results[i].error is not None:
            return
        async with sem:
            try:
                b = await ask(client, secrets_by_pair[i], pairs[i]["b"])
            except Exception as e:
                results[i].error = f"b: {_err(e)}"
                return
        r = results[i]
        r.b_status, r.similarity = b.status, b.similarity
        if r.hit:
            r.served_a_answer = b.content == answers_a[i]
            if not r.served_a_answer:
                report.anomalies.append(f"{r.id}: {b.status} did not serve a's answer")
        if b.status not in {*HITS, "miss"}:
            report.anomalies.append(f"{r.id}: b answered {b.status!r}")
        if b.status == "hit-semantic" and b.similarity is None:
            report.anomalies.append(f"{r.id}: hit-semantic without {SIM_HEADER}")
        if b.status == "hit-semantic" and b.similarity is not None and b.similarity < report.threshold:
            report.anomalies.append(f"{r.id}: hit-semantic at {b.similarity} < threshold {report.threshold}")

    idx = range(len(pairs))
    t0 = time.monotonic()
    await asyncio.gather(*(setup(i) for i in idx))
    report.timings["setup_s"] = time.monotonic() - t0
    say(f"created {sum(1 for r in results if r.team)} teams and keys in {report.timings['setup_s']:.1f} s")

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)
    try:
        before = int((await semantic_state(http, gw.url)).get("entries", 0))
        t0 = time.monotonic()
        await asyncio.gather(*(phase_a(i) for i in idx))
        report.timings["phase_a_s"] = time.monotonic() - t0
        # Every a that missed was stored, and (when its last message is plain user text that fits
        # the embedding window) indexed: wait for exactly that many new vectors.
        eligible = [
            i for i in idx
            if results[i].error is None and results[i].a_first == "miss"
            and last_user_text({"messages": pairs[i]["a"]}) is not None
        ]
        short = [i for i in eligible if len(last_text(pairs[i]["a"])) <= SURELY_FITS]
        t0 = time.monotonic()
        n = await wait_indexed(
            http, gw.url, before + len(eligible), before + len(short), INDEX_WAIT_S
        ) - before
        report.timings["index_wait_s"] = time.monotonic() - t0
        report.index_entries = {"expected": len(eligible), "indexed": n}
        if n < len(eligible):
            report.anomalies.append(
                f"only {n} of {len(eligible)} a-side prompts were indexed "
                f"({len(eligible) - len(short)} are long and may be exact-only)"
            )
        say(
            f"phase A {report.timings['phase_a_s']:.1f} s; {n}/{len(eligible)} vectors indexed "
            f"after {report.timings['index_wait_s']:.1f} s"
        )
        t0 = time.monotonic()
        await asyncio.gather(*(phase_b(i) for i in idx))
        report.timings["phase_b_s"] = time.monotonic() - t0
        say(f"phase B {report.timings['phase_b_s']:.1f} s")
    finally:
        await client.close()


# ---- the report --------------------------------------------------------------------------------------


def _cell(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown(report: Report, pairs: Sequence[Pair]) -> str:
    total = report.totals()
    lines = [
        f"### Semantic cache end to end: {report.pairs_file or 'pairs'} "
        f"({total.n} pairs, threshold {report.threshold:g})",
        "",
        "| kind | n | label 1 | label 0 | predicted hits | hit-exact | hit-semantic | correct | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, c in [*report.per_kind().items(), ("**all**", total)]:
        acc = c.correct / c.n if c.n else None
        lines.append(
            f"| {kind} | {c.n} | {c.positives} | {c.negatives} | {c.hits} | {c.hit_exact} | "
            f"{c.hit_semantic} | {c.correct} | {fmt(acc)} |"
        )
    lines += [
        "",
        "| TP | FP | TN | FN | precision | recall | false-hit rate (FP / negatives) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {total.tp} | {total.fp} | {total.tn} | {total.fn} | {fmt(total.precision())} | "
        f"{fmt(total.recall())} | {fmt(total.false_hit_rate())} |",
        "",
    ]
    by_id = {p["id"]: p for p in pairs}
    fh = report.false_hits()
    lines.append(f"**False hits ({len(fh)})**" + (":" if fh else ": none"))
    if fh:
        lines += [
            "",
            "| id | kind | status | similarity | a (cached) | b (new) |",
            "|---|---|---|---:|---|---|",
        ]
        for r in fh:
            p = by_id[r.id]
            lines.append(
                f"| {r.id} | {r.kind} | {r.b_status} | {fmt(r.similarity)} | "
                f"{_cell(last_text(p['a']))} | {_cell(last_text(p['b']))} |"
            )
    fm = report.false_misses_by_kind()
    lines += [
        "",
        f"**False misses ({sum(fm.values())})**: "
        + (", ".join(f"{k} {v}" for k, v in fm.items()) if fm else "none")
        + (f" (earlier turns differ in {report.false_misses_context_differs()})" if fm else ""),
    ]
    if report.vetoes:
        lines.append(
            "\nGuard vetoes over the run (tollway_cache_semantic_vetoes_total, by rule): "
            + ", ".join(f"{k} {v:g}" for k, v in report.vetoes.items())
            + f" ({report.veto_label_values} distinct `reason` label values)"
        )
    if report.anomalies:
        lines += ["", f"**Anomalies ({len(report.anomalies)})**:", *(f"- {a}" for a in report.anomalies[:50])]
    t = report.timings
    lines.append(
        "\nTimings: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items())
    )
    code = report.code
    if code:
        dirty = f", {len(code['changed'])} gateway files changed since" if code.get("changed") else ""
        head = code.get("git_head") or "?"
        lines.append(f"Gateway code: HEAD {head}{dirty}; sources sha256 {code['sha256']}")
    return "\n".join(lines)


def targets_missed(total: Counts, min_precision: float | None, min_recall: float | None) -> list[str]:
    """The targets not met (an undefined precision or recall misses its target)."""
    missed = []
    precision, recall = total.precision(), total.recall()
    if min_precision is not None and (precision is None or precision < min_precision):
        missed.append(f"precision {fmt(precision)} < {min_precision}")
    if min_recall is not None and (recall is None or recall < min_recall):
        missed.append(f"recall {fmt(recall)} < {min_recall}")
    return missed


# ---- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, default=PAIRS)
    ap.add_argument(
        "--threshold", type=float, default=None,
        help=f"cache.semantic.threshold of the gateway (default: the config default, {DEFAULT_THRESHOLD})",
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    ap.add_argument("--ids", default=None, help="comma-separated pair ids (instead of --limit)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also write the full result here")
    ap.add_argument("--min-precision", type=float, default=None)
    ap.add_argument("--min-recall", type=float, default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    ids = [s.strip() for s in args.ids.split(",") if s.strip()] if args.ids else None
    pairs = select(load_pairs(args.pairs), ids, args.limit)
    if not pairs:
        raise SystemExit(f"no pairs in {args.pairs}")
    try:
        report = asyncio.run(
            evaluate_e2e(
                pairs,
                threshold=args.threshold,
                concurrency=args.concurrency,
                pairs_file=str(args.pairs),
                log=not args.quiet,
            )
        )
    except GatewayFailure as e:
        print(f"gateway failure: {e}", file=sys.stderr)
        return 2
    print(markdown(report, pairs))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(pairs), indent=2) + "\n", encoding="utf-8")
    missed = targets_missed(report.totals(), args.min_precision, args.min_recall)
    if missed:
        print("\ntargets missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
