import random
from collections import Counter

import pytest

from bench.policies import POLICIES
from gateway.scheduling.config import parse_config
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.scheduler import NoCandidateError, Scheduler
from gateway.scheduling.types import Candidate, RequestInfo

HASHES = tuple(range(100, 164))  # a 1,024-token prompt in 16-token blocks
REQ = RequestInfo(prompt_tokens=1100, block_hashes=HASHES, block_size=16)  # 76 tokens past the full blocks


def pool(role: str, n: int, **kw) -> list[Candidate]:
    return [Candidate(f"{role[0]}{i}", f"{role}:{i}", role, total_blocks=1000, free_blocks=900, **kw) for i in range(n)]


def make(policy: str = "prefix_load", seed: int = 0) -> tuple[Scheduler, PrefixIndex]:
    idx = PrefixIndex()
    return Scheduler(parse_config(POLICIES[policy]), idx, random.Random(seed)), idx


def test_prefix_affinity_wins_when_load_is_even():
    s, idx = make()
    idx.snapshot("p1", HASHES, 0)
    idx.snapshot("p0", HASHES[:8], 0)
    sched = s.schedule(REQ, pool("prefill", 3), pool("decode", 1))
    assert sched.prefill.candidate.worker_id == "p1"
    assert sched.predicted_cached_tokens == 1024 and not sched.load_only and sched.decision.disaggregate


def test_almost_fully_cached_prompt_is_decode_only():
    s, idx = make()
    for w in ("p0", "d0"):
        idx.snapshot(w, HASHES, 0)
    sched = s.schedule(RequestInfo(1030, HASHES, 16), pool("prefill", 1), pool("decode", 1))
    assert (sched.decision.disaggregate, sched.decision.reason) == (False, "short-uncached")
    assert sched.prefill is None and sched.predicted_cached_tokens == 1024


def test_uncached_prompt_goes_pd_and_records_prediction():
    s, idx = make()
    idx.snapshot("p1", HASHES[:32], 0)
    sched = s.schedule(REQ, pool("prefill", 2), pool("decode", 2))
    assert sched.decision.disaggregate and sched.prefill.candidate.worker_id == "p1"
    assert sched.predicted_cached_tokens == 512


def test_imbalance_guard_sets_affinity_aside():
    s, idx = make()
    idx.snapshot("p0", HASHES, 0)
    busy = Candidate("p0", "a", "prefill", waiting=12, total_blocks=1000, free_blocks=900)
    idle = Candidate("p1", "b", "prefill", waiting=0, total_blocks=1000, free_blocks=900)
    sched = s.schedule(RequestInfo(2000, HASHES, 16), [busy, idle], pool("decode", 1))
    assert sched.load_only and sched.prefill.candidate.worker_id == "p1"


def test_short_uncached_prompt_is_decode_only_and_prefers_decode_cache():
    s, idx = make()
    idx.snapshot("d1", HASHES[:2], 0)
    sched = s.schedule(RequestInfo(30, HASHES[:1], 16), pool("prefill", 1), pool("decode", 2))
    assert not sched.decision.disaggregate and sched.prefill is None
    assert sched.decode.candidate.worker_id == "d1"


def test_filtered_out_pools_explain_themselves():
    s, _ = make()
    with pytest.raises(NoCandidateError, match="d0: layout mismatch"):
        s.schedule(REQ, pool("prefill", 1), pool("decode", 1, layout_ok=False))
    with pytest.raises(NoCandidateError, match="no decode worker is registered"):
        s.schedule(REQ, pool("prefill", 1), [])
    sched = s.schedule(REQ, pool("prefill", 1, healthy=False), pool("decode", 1))
    assert sched.decision.reason == "no-prefill-worker"


def test_round_robin_and_least_loaded_policies():
    s, idx = make("round_robin")
    idx.snapshot("p0", HASHES, 0)
    picks = Counter(
        s.schedule(REQ, pool("prefill", 3), pool("decode", 1)).prefill.candidate.worker_id for _ in range(30)
    )
    assert picks == {"p0": 10, "p1": 10, "p2": 10}
    s, idx = make("least_loaded")
    idx.snapshot("p0", HASHES, 0)
    cands = [
        Candidate("p0", "a", "prefill", waiting=3, total_blocks=10, free_blocks=9),
        Candidate("p1", "b", "prefill", waiting=0, total_blocks=10, free_blocks=9),
    ]
    assert s.schedule(REQ, cands, pool("decode", 1)).prefill.candidate.worker_id == "p1"


def test_model_and_pool_filters_hold_even_when_a_profile_leaves_them_out():
    config = parse_config(
        {
            "profiles": {
                "prefill": {"filters": ["health"], "scorers": [{"type": "queue-depth"}]},
                "decode": {"filters": ["health"], "scorers": [{"type": "running"}]},
            }
        }
    )
    sched = Scheduler(config, PrefixIndex(), random.Random(0))
    decode = [Candidate("d0", "a", "decode", serves_model=False), Candidate("d1", "b", "decode", in_pool=False)]
    with pytest.raises(NoCandidateError, match="d0: does not serve the model; d1: not in the workload"):
        sched.schedule(REQ, [], decode)


def test_a_decode_worker_that_would_load_the_model_prefills_itself():
    sched, _ = make()
    s = sched.schedule(REQ, pool("prefill", 2), pool("decode", 1, model_loaded=False))
    assert s.prefill is None and s.decision.reason == "decode-model-cold"
    s = sched.schedule(REQ, pool("prefill", 2), pool("decode", 1))
    assert s.prefill is not None and s.decision.disaggregate
