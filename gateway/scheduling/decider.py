"""Whether disaggregation pays for one request. Decode-only (the decode worker prefills locally)
when the uncached part of the prompt is short — moving KV would cost more than computing it —
or when every prefill worker is saturated."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.scheduling.types import Candidate


@dataclass(frozen=True)
class PDDecision:
    disaggregate: bool
    reason: str  # "pd" | "short-uncached" | "prefill-saturated" | "no-prefill-worker" | "decode-model-cold"


@dataclass(frozen=True)
class PDDecider:
    min_uncached_tokens: int = 32
    max_prefill_waiting: int = 8
    enabled: bool = True

    def decide(self, uncached_tokens: int, prefill_pool: list[Candidate]) -> PDDecision:
        if not prefill_pool:
            return PDDecision(False, "no-prefill-worker")
        if not self.enabled:
            return PDDecision(True, "pd")
        if uncached_tokens < self.min_uncached_tokens:
            return PDDecision(False, "short-uncached")
        if all(c.waiting >= self.max_prefill_waiting for c in prefill_pool):
            return PDDecision(False, "prefill-saturated")
        return PDDecision(True, "pd")
