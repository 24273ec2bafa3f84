import random
from collections import Counter

import pytest

from gateway.scheduling.decider import PDDecider
from gateway.scheduling.imbalance import ImbalanceGuard
from gateway.scheduling.picker import MaxScorePicker
from gateway.scheduling.types import Candidate, ScoredCandidate


def sc(wid: str, total: float) -> ScoredCandidate:
    return ScoredCandidate(Candidate(wid, wid, "prefill"), total=total)


def test_picker_takes_the_best():
    assert (
        MaxScorePicker(rng=random.Random(0)).pick([sc("a", 0.2), sc("b", 0.9), sc("c", 0.5)]).candidate.worker_id == "b"
    )


def test_picker_breaks_ties_at_random():
    picker = MaxScorePicker(rng=random.Random(1))
    counts = Counter(picker.pick([sc("a", 1.0), sc("b", 1.0), sc("c", 0.1)]).candidate.worker_id for _ in range(400))
    assert set(counts) == {"a", "b"} and min(counts.values()) > 150


def test_softmax_temperature_spreads_but_prefers_the_best():
    picker = MaxScorePicker(temperature=0.5, rng=random.Random(2))
    counts = Counter(picker.pick([sc("a", 1.0), sc("b", 0.0)]).candidate.worker_id for _ in range(1000))
    assert counts["a"] > counts["b"] > 0


def test_picker_rejects_bad_input():
    with pytest.raises(ValueError):
        MaxScorePicker(temperature=-1)
    with pytest.raises(ValueError):
        MaxScorePicker().pick([])


def loads(*values: int) -> list[Candidate]:
    return [Candidate(f"w{i}", "", "prefill", waiting=v) for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("pool", "imbalanced"),
    [
        (loads(10, 1), True),  # 9 apart and 10x
        (loads(5, 1), False),  # only 4 apart: not beyond absolute=4
        (loads(30, 25), False),  # far apart in count but within 1.5x
        (loads(40, 25), True),
        (loads(10), False),  # one worker cannot be imbalanced
        (loads(0, 0, 9), True),
    ],
)
def test_imbalance_guard(pool, imbalanced):
    assert ImbalanceGuard(absolute=4, relative=1.5).imbalanced(pool) is imbalanced


@pytest.mark.parametrize(
    ("uncached", "pool", "disaggregate", "reason"),
    [
        (500, loads(0), True, "pd"),
        (10, loads(0), False, "short-uncached"),
        (500, [], False, "no-prefill-worker"),
        (500, loads(8, 9), False, "prefill-saturated"),
        (500, loads(8, 2), True, "pd"),
        (32, loads(0), True, "pd"),
    ],
)
def test_decider(uncached, pool, disaggregate, reason):
    d = PDDecider(min_uncached_tokens=32, max_prefill_waiting=8).decide(uncached, pool)
    assert (d.disaggregate, d.reason) == (disaggregate, reason)


def test_disabled_decider_always_disaggregates_when_it_can():
    d = PDDecider(enabled=False)
    assert d.decide(0, loads(99)).disaggregate
    assert not d.decide(500, []).disaggregate
