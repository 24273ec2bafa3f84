from gateway.scheduling.prefix_index import PrefixIndex


def test_events_after_a_snapshot_update_the_view():
    idx = PrefixIndex()
    assert idx.needs_snapshot("w")
    idx.snapshot("w", [1, 2], last_seq=10)
    assert idx.apply("w", 11, "stored", 3)
    assert idx.apply("w", 12, "removed", 1)
    assert idx.match("w", [2, 3]) == 2 and idx.match("w", [1, 2]) == 0
    assert idx.last_seq("w") == 12


def test_a_gap_marks_the_view_stale_until_resync():
    idx = PrefixIndex()
    idx.snapshot("w", [1], last_seq=5)
    assert not idx.apply("w", 7, "stored", 2)  # seq 6 was lost
    assert idx.needs_snapshot("w") and idx.match("w", [1]) == 0
    assert not idx.apply("w", 8, "stored", 3)
    idx.snapshot("w", [1, 2, 3], last_seq=8)
    assert idx.match("w", [1, 2, 3]) == 3


def test_replayed_events_are_ignored_and_match_stops_at_first_missing_block():
    idx = PrefixIndex()
    idx.snapshot("w", [1, 3], last_seq=2)
    assert idx.apply("w", 2, "removed", 1)  # already applied: no effect
    assert idx.match("w", [1, 2, 3]) == 1
    idx.forget("w")
    assert idx.match("w", [1]) == 0
