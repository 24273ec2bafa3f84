"""The anti-hot-spot guard. When one worker carries much more than another (more than `absolute`
requests more, and more than `relative` times as many), cache affinity is set aside and load
alone decides, so one popular prefix cannot melt one worker."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.scheduling.types import Candidate


@dataclass(frozen=True)
class ImbalanceGuard:
    absolute: int = 4
    relative: float = 1.5

    def imbalanced(self, candidates: list[Candidate]) -> bool:
        if len(candidates) < 2:
            return False
        loads = [c.load for c in candidates]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.absolute and hi > self.relative * lo
