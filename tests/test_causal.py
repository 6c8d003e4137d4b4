"""Causal tests that can fail (issue 19): test pairs drawn at random, layer skipping and exchange, held-out
splits, matched controls and the error-minus-twin interaction, on planted tiny models."""

from __future__ import annotations

from eclens.pairs import AlignedPair, MinimalPair
from eclens.steps import spread_pairs


def _fake(i: int, cat: str, cluster: str, length: int) -> AlignedPair:
    mp = MinimalPair(f"{cat}-{cluster}-{i}", "a", "b", cat, cluster=cluster)
    ids = list(range(length))
    return AlignedPair(mp, ids, ids[:1] + [999] + ids[2:], 1, "x", "y")


def test_spread_pairs_is_a_seeded_stratified_draw_never_by_length():
    pairs = [_fake(i, cat, f"c{i % 4}", 3 + i) for cat in ("a", "b") for i in range(12)]
    got = spread_pairs(pairs, 8, seed=0)
    # categories in turn, and within one category every cluster once before any cluster twice
    assert [a.category for a in got] == ["a", "b"] * 4
    for cat in ("a", "b"):
        assert len({a.pair.cluster for a in got if a.category == cat}) == 4
    # a function of the set of pairs (input order does not matter), a prefix of the full order, and seeded
    assert [a.id for a in spread_pairs(pairs[::-1], 8, seed=0)] == [a.id for a in got]
    full = spread_pairs(pairs, len(pairs), seed=0)
    assert [a.id for a in spread_pairs(full, 8, seed=0)] == [a.id for a in full[:8]]
    draws = {tuple(a.id for a in spread_pairs(pairs, 4, seed=s)) for s in range(6)}
    assert len(draws) > 1
    # not the shortest: over seeds the drawn pairs' lengths are spread like the pool's
    lengths = [a.length for s in range(20) for a in spread_pairs(pairs, 4, seed=s)]
    assert max(lengths) - min(lengths) > 6
