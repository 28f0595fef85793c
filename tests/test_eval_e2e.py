"""eval/e2e.py: the end-to-end semantic-cache evaluation, run on 13 labelled pairs through a
real gateway process (mock provider, embedding model loaded), and its report's arithmetic."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.settings import SemanticCacheSettings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "eval" / "e2e.py"
PAIRS = ROOT / "eval" / "semantic_pairs.jsonl"

IDS = [
    # label 1: paraphrases that differ only slightly (a contraction, "Can you ..."; similarity > 0.97
    # with all-MiniLM-L6-v2: several, so that one still hits when a guard gets stricter),
    # a plain one, one that misses, and a multi-turn conversation whose earlier turns are equal
    "paraphrase-049",
    "paraphrase-135",
    "paraphrase-060",
    "paraphrase-001",
    "paraphrase-002",
    "multiturn-051",
    # label 0: one of each guard's kinds, a different system prompt, a good/bad flip
    "number-001",
    "unit-001",
    "negation-001",
    "quote-001",
    "direction-001",
    "multiturn-001",
    "keyword-026",
]


def load_e2e() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tollway_eval_e2e", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def close(x: float | None, y: float | None) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("e2e") / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--pairs", str(PAIRS), "--ids", ",".join(IDS), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text(encoding="utf-8"))


def test_e2e_report_is_consistent(run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    proc, data = run
    pairs = {p["id"]: p for p in map(json.loads, PAIRS.read_text(encoding="utf-8").splitlines()) if p}
    assert data["threshold"] == SemanticCacheSettings().threshold  # the config default
    assert data["errors"] == 0 and data["anomalies"] == []
    n, tp, fp, tn, fn = (data[k] for k in ("n", "tp", "fp", "tn", "fn"))
    assert n == len(IDS) == tp + fp + tn + fn
    assert {pairs[i]["label"] for i in IDS} == {0, 1}
    assert tp + fn == data["label_1"] == sum(pairs[i]["label"] for i in IDS)
    assert fp + tn == data["label_0"]
    assert data["predicted_hits"] == tp + fp == data["hit_exact"] + data["hit_semantic"]
    assert data["correct"] == tp + tn
    assert close(data["precision"], ratio(tp, tp + fp))
    assert close(data["recall"], ratio(tp, tp + fn))
    assert close(data["false_hit_rate"], ratio(fp, fp + tn))

    # per pair: what was sent and served
    results = {r["id"]: r for r in data["results"]}
    assert list(results) == IDS
    for pid, r in results.items():
        assert r["label"] == pairs[pid]["label"] and r["kind"] == pairs[pid]["kind"]
        assert (r["a_first"], r["a_again"]) == ("miss", "hit-exact"), r
        assert r["b_status"] in {"miss", "hit-exact", "hit-semantic"}, r
        hit = r["b_status"] != "miss"
        assert r["served_a_answer"] is (True if hit else None), r  # a hit serves a's own answer
        if r["b_status"] == "hit-semantic":
            assert data["threshold"] <= r["similarity"] <= 1.0, r
        else:
            assert r["similarity"] is None, r
    semantic = [r for r in results.values() if r["kind"] == "paraphrase" and r["b_status"] == "hit-semantic"]
    assert semantic, "no paraphrase was served as hit-semantic"

    # per kind adds up to the totals
    per_kind = data["per_kind"]
    assert set(per_kind) == {pairs[i]["kind"] for i in IDS}
    for key in ("n", "tp", "fp", "tn", "fn", "hit_exact", "hit_semantic", "correct"):
        assert sum(c[key] for c in per_kind.values()) == data[key], key

    # the false hits listed are exactly the label-0 hits, with their texts
    false_hits = [r for r in results.values() if r["label"] == 0 and r["b_status"] != "miss"]
    assert [h["id"] for h in data["false_hits"]] == [r["id"] for r in false_hits]
    for h in data["false_hits"]:
        assert h["a"] == pairs[h["id"]]["a"][-1]["content"] and h["b"] == pairs[h["id"]]["b"][-1]["content"]
    false_misses = [r["kind"] for r in results.values() if r["label"] == 1 and r["b_status"] == "miss"]
    assert sum(data["false_misses_by_kind"].values()) == len(false_misses) == fn
    assert 0 <= data["false_misses_context_differs"] <= fn

    # the markdown report on stdout
    assert "| kind | n | label 1 | label 0 | predicted hits |" in proc.stdout
    assert f"| {tp} | {fp} | {tn} | {fn} |" in proc.stdout


def test_targets() -> None:
    e2e = load_e2e()
    c = e2e.Counts(tp=9, fp=1, tn=5, fn=9)
    assert e2e.targets_missed(c, None, None) == []
    assert e2e.targets_missed(c, 0.9, 0.5) == []
    assert len(e2e.targets_missed(c, 0.95, 0.5)) == 1
    assert len(e2e.targets_missed(c, 0.95, 0.6)) == 2
    assert e2e.targets_missed(e2e.Counts(tn=3), 0.9, None) == ["precision - < 0.9"]  # no hit at all
    assert e2e.select([{"id": "x"}, {"id": "y"}], ["y"]) == [{"id": "y"}]
    assert e2e.select([{"id": "x"}, {"id": "y"}], None, 1) == [{"id": "x"}]
