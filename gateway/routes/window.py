"""A sliding window of one variant's recent outcomes: what the judge compares variants on.

Memory is bounded twice: samples older than the window are dropped as new ones arrive, and at most
`max_samples` are kept (under heavier traffic the window holds the most recent ones only, which is
still a fair sample of the variant).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    at: float
    ok: bool
    ttft_s: float | None  # None: no first token (it failed before one)
    tpot_s: float | None  # None: fewer than two tokens


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    ttft_p95: float | None
    tpot_p95: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile (an observed value, never an interpolation)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


class Window:
    def __init__(self, window_s: float, max_samples: int = 10_000) -> None:
        self.window_s = window_s
        self._samples: deque[Outcome] = deque(maxlen=max_samples)

    def add(self, outcome: Outcome) -> None:
        self._samples.append(outcome)
        horizon = outcome.at - self.window_s
        while self._samples and self._samples[0].at < horizon:
            self._samples.popleft()

    def stats(self, now: float, since: float | None = None) -> WindowStats:
        """Over the last `window_s` seconds, and only samples after `since` when given."""
        start = now - self.window_s if since is None else max(now - self.window_s, since)
        recent = [s for s in self._samples if start <= s.at <= now]
        return WindowStats(
            requests=len(recent),
            errors=sum(not s.ok for s in recent),
            ttft_p95=p95([s.ttft_s for s in recent if s.ttft_s is not None]),
            tpot_p95=p95([s.tpot_s for s in recent if s.tpot_s is not None]),
        )

    def __len__(self) -> int:
        return len(self._samples)
