"""The semantic cache's FAISS index: per-(partition, model) separation, removal, expiry, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.cache.index import SemanticIndex

DIM = 384


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def near(v: np.ndarray, rng: np.random.Generator, eps: float = 0.05) -> np.ndarray:
    w = v + eps * unit(rng)[0]
    return (w / np.linalg.norm(w)).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_add_and_search_returns_the_nearest_with_cosine(rng: np.random.Generator) -> None:
    idx = SemanticIndex()
    vecs = unit(rng, 50)
    for i, v in enumerate(vecs):
        idx.add("team-a", "gpt-x", v, f"e{i}", {"n": i})
    assert idx.size() == 50 == idx.size("team-a", "gpt-x")
    hits = idx.search("team-a", "gpt-x", near(vecs[7], rng), k=3)
    assert hits[0][0] == "e7"
    assert 0.95 < hits[0][1] <= 1.0001
    assert hits[0][1] >= hits[1][1] >= hits[2][1]
    exact = idx.search("team-a", "gpt-x", vecs[7], k=1)
    assert exact[0][0] == "e7" and exact[0][1] == pytest.approx(1.0, abs=1e-5)
    found, metas = idx.search_meta("team-a", "gpt-x", vecs[7], k=1)
    assert found[0][0] == "e7" and metas == [{"n": 7}]


def test_partitions_and_models_are_separate(rng: np.random.Generator) -> None:
    idx = SemanticIndex()
    v = unit(rng)[0]
    idx.add("team-a", "gpt-x", v, "a-secret")
    for partition, model in [("team-b", "gpt-x"), ("team-a", "gpt-y"), ("shared", "gpt-x")]:
        assert idx.search(partition, model, v, k=5) == []
    # even when the other partition has entries of its own, A's is never among them
    idx.add("team-b", "gpt-x", unit(rng)[0], "b-1")
    for _ in range(20):
        idx.add("team-b", "gpt-x", unit(rng)[0], f"b-{_ + 2}")
    ids = [e for e, _s in idx.search("team-b", "gpt-x", v, k=100)]
    assert "a-secret" not in ids and len(ids) == 21
    assert idx.search("team-a", "gpt-x", v, k=100) == [("a-secret", pytest.approx(1.0, abs=1e-5))]
    assert idx.size("team-a") == 1 and idx.size("team-b") == 21


def test_remove_replace_and_purge(rng: np.random.Generator) -> None:
    idx = SemanticIndex()
    a, b, c = unit(rng, 3)
    idx.add("p", "m", a, "a")
    idx.add("p", "m", b, "b")
    assert idx.remove("p", "m", "a") is True
    assert idx.remove("p", "m", "a") is False
    assert idx.remove("other", "m", "b") is False
    assert [e for e, _ in idx.search("p", "m", a, k=5)] == ["b"]
    # re-adding an id replaces its vector
    idx.add("p", "m", c, "b")
    assert idx.size("p", "m") == 1
    assert idx.search("p", "m", c, k=1)[0][1] == pytest.approx(1.0, abs=1e-5)
    idx.add("p", "m2", a, "x")
    idx.add("q", "m", a, "y")
    assert idx.purge(model="m") == 2
    assert idx.keys() == [("p", "m2")]
    assert idx.purge(partition="p") == 1
    assert idx.size() == 0


def test_expired_entries_are_not_returned_and_can_be_expired() -> None:
    now = [1000.0]
    idx = SemanticIndex(clock=lambda: now[0])
    rng = np.random.default_rng(7)
    a, b = unit(rng, 2)
    idx.add("p", "m", a, "short", ttl_s=10)
    idx.add("p", "m", b, "forever")
    assert next(e for e, _ in idx.search("p", "m", a, k=2)) == "short"
    now[0] += 11
    assert [e for e, _ in idx.search("p", "m", a, k=2)] == ["forever"]
    assert idx.expire() == 1
    assert idx.size() == 1


def test_search_batch_answers_each_query(rng: np.random.Generator) -> None:
    idx = SemanticIndex()
    vecs = unit(rng, 30)
    for i, v in enumerate(vecs):
        idx.add("p", "m", v, f"e{i}")
    out = idx.search_batch("p", "m", vecs[[3, 9, 27]], k=1)
    assert [hits[0][0] for hits, _ in out] == ["e3", "e9", "e27"]
    assert idx.search_batch("nobody", "m", vecs[:2], k=1) == [([], []), ([], [])]


def test_save_and_load_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = SemanticIndex()
    va = unit(rng, 10)
    vb = unit(rng, 5)
    for i, v in enumerate(va):
        idx.add("team-a", "gpt-x", v, f"a{i}", {"key": f"k{i}", "n": i})
    for i, v in enumerate(vb):
        idx.add("team/b with spaces", "gpt-y", v, f"b{i}", ttl_s=3600)
    idx.remove("team-a", "gpt-x", "a3")
    idx.save(tmp_path)

    back = SemanticIndex.load(tmp_path)
    assert back.keys() == idx.keys()
    assert back.size() == 14
    hits, metas = back.search_meta("team-a", "gpt-x", va[5], k=1)
    assert hits[0][0] == "a5" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert metas == [{"key": "k5", "n": 5}]
    assert all(e != "a3" for e, _ in back.search("team-a", "gpt-x", va[3], k=20))
    assert back.search("team/b with spaces", "gpt-y", vb[2], k=1)[0][0] == "b2"
    assert back.search("team-a", "gpt-y", vb[2], k=1) == []
    # ids keep growing after a reload: a new entry never collides with an old one
    back.add("team-a", "gpt-x", unit(rng)[0], "new")
    assert back.size("team-a", "gpt-x") == 10

    # a purged index's files disappear at the next save
    back.purge(partition="team-a")
    back.save(tmp_path)
    again = SemanticIndex.load(tmp_path)
    assert again.keys() == [("team/b with spaces", "gpt-y")]
    assert len(list(tmp_path.glob("*.faiss"))) == 1


def test_load_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert SemanticIndex.load(tmp_path / "absent").size() == 0


def test_expired_entries_are_dropped_at_load(tmp_path: Path) -> None:
    now = [0.0]
    idx = SemanticIndex(clock=lambda: now[0])
    idx.add("p", "m", unit(np.random.default_rng(1))[0], "x", ttl_s=5)
    idx.save(tmp_path)
    now[0] = 10.0
    assert SemanticIndex.load(tmp_path, clock=lambda: now[0]).size() == 0


def test_rejects_wrong_dimension() -> None:
    idx = SemanticIndex()
    with pytest.raises(ValueError):
        idx.add("p", "m", np.zeros(10, dtype=np.float32), "x")


def test_add_batch_then_single_adds_and_replacements(rng: np.random.Generator) -> None:
    idx = SemanticIndex()
    vecs = unit(rng, 100)
    idx.add_batch("p", "m", vecs, [f"e{i}" for i in range(100)], [{"i": i} for i in range(100)])
    assert idx.size("p", "m") == 100
    assert idx.search_meta("p", "m", vecs[42], k=1) == ([("e42", pytest.approx(1.0, abs=1e-5))], [{"i": 42}])
    idx.add("p", "m", vecs[0], "e42")  # replaces e42's vector
    assert idx.size("p", "m") == 100
    assert {e for e, _ in idx.search("p", "m", vecs[0], k=2)} == {"e0", "e42"}
    idx.add_batch("p", "m", vecs[:2], ["e0", "fresh"])
    assert idx.size("p", "m") == 101
    with pytest.raises(ValueError):
        idx.add_batch("p", "m", vecs[:2], ["dup", "dup"])


def test_entries_leave_the_garbage_collector_alone(rng: np.random.Generator) -> None:
    """Entries are tuples of atomic values, which the collector stops tracking after one pass: a
    large index adds next to nothing to what every full collection walks (one tracked object per
    entry made a full collection of a 100k-entry index take ~19 ms, on the event loop's thread)."""
    import gc

    idx = SemanticIndex()
    idx.add("team-a", "m", unit(rng), "first")  # imports FAISS, creates the partition
    n = 20_000
    gc.collect()
    before = len(gc.get_objects())
    idx.add_batch("team-a", "m", unit(rng, n), [f"e{i}" for i in range(n)],
                  [{"text": f"question {i}", "key": f"k{i}", "at": float(i)} for i in range(n)])
    idx.add("team-a", "m", unit(rng), "one-more", {"text": "q", "key": "k", "at": 1.0}, ttl_s=60)
    gc.collect()
    assert len(gc.get_objects()) - before < 500
    hits, metas = idx.search_meta("team-a", "m", unit(rng), 3)
    assert len(hits) == 3 and all(set(m) == {"text", "key", "at"} for m in metas)
