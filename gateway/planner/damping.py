"""Damping for one pool, so that a noisy signal never makes the pool flap.

Growth is prompt but confirmed: the need must stay above the current size for `up_ticks` ticks
in a row, and the pool grows to the smallest of those needs. Shrinking is slow, as Kubernetes'
HPA does it with its downscale stabilization: the pool shrinks only to the largest need seen over
the last `down_ticks` ticks, by at most a bounded share of the pool at a time. After any change,
`cooldown_ticks` ticks pass before the next one, so new workers can start and show their effect.
Limits (min/max) apply at once: they are configuration, not a signal."""

from __future__ import annotations

import math
from collections import deque


class Damper:
    def __init__(self, up_ticks: int, down_ticks: int, cooldown_ticks: int, max_down_fraction: float) -> None:
        self._up: deque[int] = deque(maxlen=up_ticks)
        self._needs: deque[int] = deque(maxlen=down_ticks)
        self._cooldown_ticks = cooldown_ticks
        self._max_down_fraction = max_down_fraction
        self._since_change = cooldown_ticks

    def step(self, current: int, need: int | None, reason: str, lo: int, hi: int) -> tuple[int, str]:
        """The size to run this tick, and why. `need` None means the signals could not tell."""
        self._since_change += 1
        if current < lo or current > hi:
            return self._change(min(max(current, lo), hi), f"configured limits are {lo}..{hi}")
        if need is None:
            self._up.clear()
            return current, f"{reason}: holding"
        self._needs.append(need)
        if need > current:
            self._up.append(need)
        else:
            self._up.clear()
        cooling = self._cooldown_ticks - self._since_change
        if self._up:
            if len(self._up) < self._up.maxlen:  # type: ignore[operator]
                return current, f"{reason}; wants {need}, confirming ({len(self._up)}/{self._up.maxlen} ticks)"
            if cooling > 0:
                return current, f"{reason}; wants {need}, cooling down ({cooling} more ticks)"
            return self._change(min(self._up), reason)
        if need < current:
            full = len(self._needs) == self._needs.maxlen
            largest = max(self._needs)
            if not full or largest >= current:
                seen = f"{len(self._needs)}/{self._needs.maxlen} ticks"
                return current, f"{reason}; wants {need}, stabilizing (largest need {largest} over {seen})"
            if cooling > 0:
                return current, f"{reason}; wants {largest}, cooling down ({cooling} more ticks)"
            step = max(1, math.floor(current * self._max_down_fraction))
            return self._change(max(largest, current - step), reason)
        return current, reason

    def _change(self, size: int, reason: str) -> tuple[int, str]:
        self._since_change = 0
        self._up.clear()
        return size, reason
