"""Every labelled evaluation set under eval/ meets issue 5's target through the cache's own matcher.

The matcher is eval/evaluate.py's: exact earlier turns, `gateway.cache.guards.compatible` on the last
user message, and cosine similarity of the gateway's own embedder (all-MiniLM-L6-v2) at the configured
default threshold. A guard change that lets a labelled hard negative through, or that vetoes so much that
recall collapses, fails here. eval/e2e.py measures the same through a running gateway.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.settings import SemanticCacheSettings

ROOT = Path(__file__).resolve().parents[1]
SETS = sorted((ROOT / "eval").glob("*pairs.jsonl"))


def _evaluate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tollway_eval_evaluate", ROOT / "eval" / "evaluate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def similarity() -> Any:
    ev = _evaluate_module()
    texts = []
    for path in SETS:
        for line in path.read_text(encoding="utf-8").splitlines():
            p = json.loads(line)
            texts += [ev.message_text(p["a"][-1]), ev.message_text(p["b"][-1])]
    return ev, ev.embed_similarity(texts)


def test_there_are_several_sets_with_enough_pairs() -> None:
    assert len(SETS) >= 3
    for path in SETS:
        pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(pairs) >= 300, path.name
        assert len({p["id"] for p in pairs}) == len(pairs)
        for p in pairs:
            assert set(p) == {"id", "kind", "a", "b", "label"} and p["label"] in (0, 1)
            assert p["a"][-1]["role"] == "user" and p["b"][-1]["role"] == "user"
        positives = sum(p["label"] for p in pairs)
        assert 0.4 <= positives / len(pairs) <= 0.6, path.name
        assert any(p["kind"] == "multiturn" and p["label"] == 0 for p in pairs), path.name


@pytest.mark.parametrize("path", SETS, ids=[p.name for p in SETS])
def test_precision_and_recall_at_the_configured_threshold(path: Path, similarity: Any) -> None:
    ev, sim = similarity
    threshold = SemanticCacheSettings().threshold
    total, _ = ev.evaluate(ev.load_pairs(path), ev.make_matcher(sim, threshold))
    precision, recall = total.precision(), total.recall()
    assert precision is not None and precision >= 0.98, (path.name, precision, total.false_hits)
    assert recall is not None and recall >= 0.5, (path.name, recall)
