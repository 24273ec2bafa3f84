"""Scorers: each rates every candidate in [0, 1]; the profile's weights combine them."""

from __future__ import annotations

from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.types import Candidate, RequestInfo


def _clamp(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


class PrefixScorer:
    """Share of the prompt's full blocks the worker already holds (longest cached prefix)."""

    type_name = "prefix-cache"

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        if not req.block_hashes:
            return [0.0] * len(candidates)
        n = len(req.block_hashes)
        return [_clamp(self.index.match(c.worker_id, req.block_hashes) / n) for c in candidates]


class QueueScorer:
    """Fewer waiting requests is better, relative to the longest queue among the candidates."""

    type_name = "queue-depth"

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        worst = max((c.waiting for c in candidates), default=0)
        return [1.0 if worst == 0 else _clamp(1 - c.waiting / worst) for c in candidates]


class KVUsageScorer:
    """More free KV blocks is better."""

    type_name = "kv-usage"

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        return [_clamp(1 - c.kv_usage) for c in candidates]


class InflightScorer:
    """Fewer prompt tokens in flight from this gateway is better (reacts faster than polled stats)."""

    type_name = "inflight-tokens"

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        worst = max((c.inflight_tokens for c in candidates), default=0)
        return [1.0 if worst == 0 else _clamp(1 - c.inflight_tokens / worst) for c in candidates]


class RunningScorer:
    """Fewer running sequences is better (a decode worker's batch size)."""

    type_name = "running"

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        worst = max((c.running for c in candidates), default=0)
        return [1.0 if worst == 0 else _clamp(1 - c.running / worst) for c in candidates]


class KVFitScorer:
    """How comfortably the request's KV fits in the worker's free blocks: the cost term of moving
    (and holding) this much KV on a decode worker."""

    type_name = "kv-fit"

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        need = -(-req.prompt_tokens // max(1, req.block_size))
        return [_clamp(1 - need / c.free_blocks) if c.free_blocks > 0 else 0.0 for c in candidates]


class ModelLoadedScorer:
    """A worker that has the request's model loaded over one that would load it first (seconds, and
    perhaps an eviction of a model others are about to use)."""

    type_name = "model-loaded"

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        return [1.0 if c.model_loaded else 0.0 for c in candidates]


# The one registry of scorer plugins: a profile names them by type_name. Every scorer but the
# prefix scorer measures load, which is what the imbalance guard keeps when it sets affinity aside.
SCORERS: dict[str, type] = {
    cls.type_name: cls
    for cls in (
        PrefixScorer,
        QueueScorer,
        KVUsageScorer,
        InflightScorer,
        RunningScorer,
        KVFitScorer,
        ModelLoadedScorer,
    )
}
LOAD_SCORERS = frozenset(name for name in SCORERS if name != PrefixScorer.type_name)
SCORER_TYPES = tuple(SCORERS)


def make_scorer(type_name: str, index: PrefixIndex):  # noqa: ANN201 - a Scorer
    """An instance of a registered scorer (the prefix scorer reads the prefix index)."""
    cls = SCORERS[type_name]
    return cls(index) if cls is PrefixScorer else cls()
