"""The scheduler: for one request, a prefill worker (or none: decode-only) and a decode worker.

1. Each pool is filtered (health, draining, layout).
2. Prefill candidates are scored by the prefill profile. If the pool is imbalanced beyond the
   guard's thresholds, only the load scorers count, so affinity cannot pile work onto one worker.
3. The best prefill worker's cached prefix gives the predicted uncached tokens; the decider chooses
   P/D or decode-only.
4. Decode candidates are scored by the decode profile (plus prefix affinity when the decode worker
   will prefill locally) and one is picked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gateway.scheduling.config import ProfileSpec, SchedulerConfig
from gateway.scheduling.decider import PDDecider, PDDecision
from gateway.scheduling.filters import FILTERS
from gateway.scheduling.imbalance import ImbalanceGuard
from gateway.scheduling.picker import PICKERS
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.scorers import LOAD_SCORERS, PrefixScorer, make_scorer
from gateway.scheduling.types import Candidate, RequestInfo, ScoredCandidate


class NoCandidateError(RuntimeError):
    """No worker of a needed role passed the filters; the message says why each was dropped."""


class NoCapacityError(NoCandidateError):
    """Decode workers are up, but none has room for this request now (back-pressure): `code` says
    which room, "kv_cache_full" or "decode_busy"."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Schedule:
    prefill: ScoredCandidate | None
    decode: ScoredCandidate
    decision: PDDecision
    predicted_cached_tokens: int
    load_only: bool  # the imbalance guard set cache affinity aside
    prefill_scored: list[ScoredCandidate]
    decode_scored: list[ScoredCandidate]


# Filters no profile can leave out: without them a request could reach a worker that does not serve
# its model, or one outside its workload class's pool.
_REQUIRED_FILTERS = ("model", "pool")


class _Profile:
    def __init__(self, spec: ProfileSpec, index: PrefixIndex, rng: random.Random) -> None:
        names = [f for f in _REQUIRED_FILTERS if f not in spec.filters] + list(spec.filters)
        self.filters = [FILTERS[f]() for f in names]
        self.scorers = [(make_scorer(s.type, index), s.weight) for s in spec.scorers]
        self.picker = PICKERS[spec.picker.type](spec.picker.temperature, rng)

    def filter(self, pool: list[Candidate], req: RequestInfo) -> list[Candidate]:
        return [c for c in pool if all(f.keep(c, req) for f in self.filters)]

    def score(
        self,
        pool: list[Candidate],
        req: RequestInfo,
        load_only: bool = False,
        extra: list[tuple[object, float]] | None = None,
    ) -> list[ScoredCandidate]:
        scored = [ScoredCandidate(c) for c in pool]
        for scorer, weight in self.scorers + (extra or []):
            if load_only and scorer.type_name not in LOAD_SCORERS:
                continue
            for s, value in zip(scored, scorer.score(pool, req), strict=True):
                s.scores[scorer.type_name] = value
                s.total += weight * value
        return scored

    def pick(self, scored: list[ScoredCandidate]) -> ScoredCandidate:
        return self.picker.pick(scored)


class Scheduler:
    def __init__(self, config: SchedulerConfig, index: PrefixIndex, rng: random.Random | None = None) -> None:
        rng = rng or random.Random()
        self.index = index
        self.prefill = _Profile(config.profiles.prefill, index, rng)
        self.decode = _Profile(config.profiles.decode, index, rng)
        self.guard = ImbalanceGuard(config.imbalance.absolute, config.imbalance.relative)
        d = config.decider
        self.decider = PDDecider(d.min_uncached_tokens, d.max_prefill_waiting, d.enabled)
        self._affinity = PrefixScorer(index)

    def schedule(self, req: RequestInfo, prefill_pool: list[Candidate], decode_pool: list[Candidate]) -> Schedule:
        decode_ok = self.decode.filter(decode_pool, req)
        if not decode_ok:
            why = _why("decode", decode_pool, req)
            reasons = {_dropped_by(c, req) for c in decode_pool}
            if reasons & _CAPACITY:
                raise NoCapacityError(why, "kv_cache_full" if "KV cache full" in reasons else "decode_busy")
            raise NoCandidateError(why)
        prefill_ok = self.prefill.filter(prefill_pool, req)
        load_only = self.guard.imbalanced(prefill_ok)
        p_scored = self.prefill.score(prefill_ok, req, load_only) if prefill_ok else []
        p_best = self.prefill.pick(p_scored) if p_scored else None
        cached_blocks = self.index.match(p_best.candidate.worker_id, req.block_hashes) if p_best else 0
        predicted = min(cached_blocks * req.block_size, max(0, req.prompt_tokens - 1))
        decision = self.decider.decide(req.prompt_tokens - predicted, prefill_ok)
        # Decode-only means the decode worker prefills: then its own cached prefix matters too.
        extra = [] if decision.disaggregate else [(self._affinity, 1.0)]
        d_scored = self.decode.score(decode_ok, req, extra=extra)
        d_best = self.decode.pick(d_scored)
        if decision.disaggregate and not d_best.candidate.model_loaded:
            # The decode worker would load the model before it could pull: longer than a prefill
            # lease. It prefills locally instead (its load has no lease to outlast).
            decision = PDDecision(False, "decode-model-cold")
        if not decision.disaggregate:
            predicted = min(
                self.index.match(d_best.candidate.worker_id, req.block_hashes) * req.block_size,
                max(0, req.prompt_tokens - 1),
            )
        return Schedule(
            p_best if decision.disaggregate else None, d_best, decision, predicted, load_only, p_scored, d_scored
        )


_CAPACITY = frozenset({"KV cache full", "stream limit"})


def _dropped_by(c: Candidate, req: RequestInfo) -> str:
    if not c.healthy:
        return "unhealthy"
    if c.draining:
        return "draining"
    if not c.serves_model:
        return "does not serve the model"
    if not c.in_pool:
        return "not in the workload class's pool"
    if not c.layout_ok:
        return "layout mismatch"
    if not FILTERS["kv-fit"]().keep(c, req):
        return "KV cache full"
    if not FILTERS["stream-limit"]().keep(c, req):
        return "stream limit"
    return "filtered"


def _why(role: str, pool: list[Candidate], req: RequestInfo) -> str:
    if not pool:
        return f"no {role} worker is registered"
    reasons = "; ".join(f"{c.worker_id}: {_dropped_by(c, req)}" for c in pool)
    return f"no {role} worker can take the request ({reasons})"
