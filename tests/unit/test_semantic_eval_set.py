"""The semantic-cache evaluation set is well-formed and the lexical baseline runs on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "eval" / "semantic_pairs.jsonl"
KINDS = {
    "paraphrase",
    "number",
    "unit",
    "quote",
    "negation",
    "direction",
    "entity",
    "language",
    "keyword",
    "multiturn",
}


def test_pairs_file_matches_the_generator_and_schema() -> None:
    lines = PAIRS.read_text(encoding="utf-8").splitlines()
    pairs = [json.loads(line) for line in lines]
    assert len(pairs) >= 340
    assert len({p["id"] for p in pairs}) == len(pairs)
    for p in pairs:
        assert set(p) == {"id", "kind", "a", "b", "label"}
        assert p["kind"] in KINDS and p["label"] in (0, 1)
        for side in (p["a"], p["b"]):
            assert side and side[-1]["role"] == "user"
            assert all(
                m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in side
            )
    positives = sum(p["label"] for p in pairs)
    assert 0.4 <= positives / len(pairs) <= 0.6
    assert sum(1 for p in pairs if p["kind"] == "multiturn" and p["label"] == 0) >= 40
    assert any(p["kind"] == "multiturn" and p["label"] == 1 for p in pairs)
    for p in pairs:
        if p["kind"] == "multiturn" and p["label"] == 0:
            assert p["a"][:-1] != p["b"][:-1], p["id"]
    generated = subprocess.run(
        [sys.executable, "-c", "import json, make_pairs; print(len(make_pairs.build()))"],
        cwd=ROOT / "eval",
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(generated.stdout) == len(pairs), "semantic_pairs.jsonl is stale: run python eval/make_pairs.py"


def test_lexical_baseline_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "evaluate.py"), "--threshold", "0.3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| **all** |" in out and "false-hit rate" in out
