"""SemanticIndex.purge_where and counts(): what the admin purge and stats of the semantic cache use."""

from __future__ import annotations

import numpy as np

from gateway.cache.index import SemanticIndex

DIM = 384


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_purge_where_filters_indexes_then_entries() -> None:
    rng = np.random.default_rng(7)
    idx = SemanticIndex()
    for partition in ("team-a:d1", "team-a:d2", "team-b:d1"):
        for model in ("m1", "m2"):
            for i in range(3):
                idx.add(partition, model, unit(rng), f"{partition}/{model}/{i}", {"at": float(i)})
    assert idx.counts() == {(p, m): 3 for p in ("team-a:d1", "team-a:d2", "team-b:d1") for m in ("m1", "m2")}

    # whole indexes: team-a's partitions of m1
    assert idx.purge_where(lambda p, m: p.startswith("team-a:") and m == "m1") == 6
    assert ("team-a:d1", "m1") not in idx.counts() and idx.size() == 12
    # some entries of the matching indexes: those with at <= 1 in team-a's m2 partitions
    team_a_m2 = lambda p, m: p.startswith("team-a:") and m == "m2"  # noqa: E731
    assert idx.purge_where(team_a_m2, lambda meta: meta["at"] <= 1) == 4
    assert set(idx.entry_ids("team-a:d1", "m2")) == {"team-a:d1/m2/2"}
    # the rest is searchable as before
    v = unit(rng)
    idx.add("team-a:d1", "m2", v, "fresh", {"at": 9.0})
    assert idx.search("team-a:d1", "m2", v, k=1)[0][0] == "fresh"
    assert idx.counts()[("team-a:d1", "m2")] == 2
    # nothing matches: nothing removed; everything matches: every index dropped
    assert idx.purge_where(lambda p, m: False) == 0
    before = idx.size()
    assert idx.purge_where(lambda p, m: True, lambda meta: True) == before and idx.size() == 0
    assert idx.counts() == {} and idx.keys() == []


def test_purge_keeps_its_behaviour() -> None:
    rng = np.random.default_rng(8)
    idx = SemanticIndex()
    for p in ("a", "b"):
        for m in ("m1", "m2"):
            idx.add(p, m, unit(rng), f"{p}{m}")
    assert idx.purge("a", "m1") == 1
    assert idx.purge(None, "m2") == 2
    assert idx.purge() == 1 and idx.size() == 0
