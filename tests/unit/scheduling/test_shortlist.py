"""Large pools: the shortlist keeps the best prefix holders and the least loaded workers, and the
holder map stays consistent with the per-worker views through events, gaps and snapshots."""

import random

from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.shortlist import ShortlistConfig, shortlist


def test_holders_by_match_finds_the_longest_prefixes_first():
    idx = PrefixIndex()
    idx.snapshot("a", [1, 2, 3], last_seq=0)
    idx.snapshot("b", [1, 2], last_seq=0)
    idx.snapshot("c", [1], last_seq=0)
    idx.snapshot("d", [9], last_seq=0)
    assert idx.holders_by_match([1, 2, 3, 4], limit=3) == [("a", 3), ("b", 2), ("c", 1)]
    assert idx.holders_by_match([1, 2, 3, 4], limit=1) == [("a", 3)]
    assert idx.holders_by_match([7, 8], limit=5) == []
    assert idx.holders_by_match([], limit=5) == []


def test_holders_follow_events_gaps_snapshots_and_forget():
    idx = PrefixIndex()
    idx.snapshot("a", [1], last_seq=0)
    assert idx.apply("a", 1, "stored", 2)
    assert idx.holders_by_match([1, 2], 5) == [("a", 2)]
    assert idx.apply("a", 2, "removed", 2)
    assert idx.holders_by_match([1, 2], 5) == [("a", 1)]
    assert not idx.apply("a", 9, "stored", 2)  # a gap: the stale view is nobody's holder
    assert idx.holders_by_match([1, 2], 5) == []
    idx.snapshot("a", [1, 2], last_seq=9)
    assert idx.holders_by_match([1, 2], 5) == [("a", 2)]
    idx.forget("a")
    assert idx.holders_by_match([1, 2], 5) == []
    assert not idx._holders  # nothing left behind


def test_small_pools_are_scored_whole():
    idx = PrefixIndex()
    assert shortlist([f"w{i}" for i in range(16)], [1], idx, random.Random(0)) is None


def test_large_pool_shortlist_keeps_cache_holders_and_least_loaded():
    idx = PrefixIndex()
    by_load = [f"w{i:04d}" for i in range(1000)]  # least loaded first
    idx.snapshot("w0900", [1, 2, 3], last_seq=0)  # the only worker with the whole prompt cached
    for w in by_load[500:600]:
        idx.snapshot(w, [1], last_seq=0)  # many share the first block only
    cfg = ShortlistConfig()
    keep = shortlist(by_load, [1, 2, 3, 4], idx, random.Random(0), cfg)
    assert keep is not None
    assert "w0900" in keep
    assert set(by_load[: cfg.least_loaded]) <= keep
    assert len(keep) <= cfg.prefix_holders + cfg.least_loaded + cfg.random
    # Different draws spread the random share over the pool.
    seen = set().union(*(shortlist(by_load, [5], idx, random.Random(s), cfg) for s in range(50)))
    assert len(seen) > cfg.least_loaded + 100
