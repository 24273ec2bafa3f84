import pytest

from gateway.scheduling.filters import HealthFilter, KVFitFilter, LayoutFilter, NotDrainingFilter, StreamLimitFilter
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.scorers import (
    InflightScorer,
    KVFitScorer,
    KVUsageScorer,
    PrefixScorer,
    QueueScorer,
    RunningScorer,
)
from gateway.scheduling.types import Candidate, RequestInfo

REQ = RequestInfo(prompt_tokens=64, block_hashes=(11, 12, 13, 14), block_size=16)


def cand(wid: str = "w", **kw) -> Candidate:
    return Candidate(wid, f"{wid}:1", "prefill", **kw)


@pytest.mark.parametrize(
    ("flt", "candidate", "kept"),
    [
        (HealthFilter(), cand(), True),
        (HealthFilter(), cand(healthy=False), False),
        (NotDrainingFilter(), cand(), True),
        (NotDrainingFilter(), cand(draining=True), False),
        (LayoutFilter(), cand(), True),
        (LayoutFilter(), cand(layout_ok=False), False),
        # 64 prompt tokens + 1 need 5 blocks of 16 on a decode worker; prefill workers are not filtered
        (KVFitFilter(), Candidate("d", "d:1", "decode", free_blocks=5), True),
        (KVFitFilter(), Candidate("d", "d:1", "decode", free_blocks=4), False),
        (KVFitFilter(), Candidate("d", "d:1", "decode", free_blocks=9, pending_blocks=5), False),
        (KVFitFilter(), Candidate("d", "d:1", "decode", free_blocks=10, pending_blocks=5), True),
        (KVFitFilter(), cand(free_blocks=0), True),
        (StreamLimitFilter(), Candidate("d", "d:1", "decode", free_blocks=9, streams=3, stream_limit=4), True),
        (StreamLimitFilter(), Candidate("d", "d:1", "decode", free_blocks=9, streams=4, stream_limit=4), False),
        (StreamLimitFilter(), Candidate("d", "d:1", "decode", free_blocks=9, streams=99, stream_limit=0), True),
    ],
)
def test_filters(flt, candidate, kept):
    assert flt.keep(candidate, REQ) is kept


def index_with(**held: tuple[int, ...]) -> PrefixIndex:
    idx = PrefixIndex()
    for wid, hashes in held.items():
        idx.snapshot(wid, hashes, 0)
    return idx


@pytest.mark.parametrize(
    ("scorer", "pool", "expected"),
    [
        (QueueScorer(), [cand("a", waiting=0), cand("b", waiting=4), cand("c", waiting=2)], [1.0, 0.0, 0.5]),
        (QueueScorer(), [cand("a"), cand("b")], [1.0, 1.0]),
        (
            KVUsageScorer(),
            [cand("a", free_blocks=10, total_blocks=10), cand("b", free_blocks=0, total_blocks=10)],
            [1.0, 0.0],
        ),
        (InflightScorer(), [cand("a", inflight_tokens=100), cand("b", inflight_tokens=25)], [0.0, 0.75]),
        (RunningScorer(), [cand("a", running=8), cand("b", running=2)], [0.0, 0.75]),
        (
            KVFitScorer(),
            [cand("a", free_blocks=8), cand("b", free_blocks=4), cand("c", free_blocks=0)],
            [0.5, 0.0, 0.0],
        ),
        (
            PrefixScorer(index_with(a=(11, 12, 13, 14), b=(11, 12), c=(12, 13, 14))),
            [cand("a"), cand("b"), cand("c"), cand("d")],
            [1.0, 0.5, 0.0, 0.0],
        ),
    ],
)
def test_scorers(scorer, pool, expected):
    scores = scorer.score(pool, REQ)
    assert scores == pytest.approx(expected)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_prefix_scorer_with_no_full_block_is_zero():
    assert PrefixScorer(index_with(a=(1,))).score([cand("a")], RequestInfo(prompt_tokens=5)) == [0.0]
