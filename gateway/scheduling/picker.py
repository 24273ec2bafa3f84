"""Pickers: the highest total wins, ties broken at random, or with a temperature a softmax draw
(max-score); or each worker in turn, scores aside (round-robin, a baseline for benchmarks)."""

from __future__ import annotations

import itertools
import math
import random

from gateway.scheduling.types import ScoredCandidate


class MaxScorePicker:
    type_name = "max-score"

    def __init__(self, temperature: float = 0.0, rng: random.Random | None = None) -> None:
        if temperature < 0:
            raise ValueError(f"picker temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        self.rng = rng or random.Random()

    def pick(self, scored: list[ScoredCandidate]) -> ScoredCandidate:
        if not scored:
            raise ValueError("no candidates to pick from")
        if self.temperature > 0:
            top = max(s.total for s in scored)
            weights = [math.exp((s.total - top) / self.temperature) for s in scored]
            return self.rng.choices(scored, weights=weights)[0]
        best = max(s.total for s in scored)
        return self.rng.choice([s for s in scored if s.total >= best - 1e-12])


class RoundRobinPicker:
    type_name = "round-robin"

    def __init__(self, temperature: float = 0.0, rng: random.Random | None = None) -> None:
        self._turn = itertools.count()

    def pick(self, scored: list[ScoredCandidate]) -> ScoredCandidate:
        if not scored:
            raise ValueError("no candidates to pick from")
        ordered = sorted(scored, key=lambda s: s.candidate.worker_id)
        return ordered[next(self._turn) % len(ordered)]


PICKERS = {cls.type_name: cls for cls in (MaxScorePicker, RoundRobinPicker)}
