"""Admission control: a request that cannot start soon gets a 429 at once, not a place in an
unbounded queue and a stream that times out later.

The queue that matters is the work waiting for its first token on the pool that prefills (the
prefill workers, or the decode workers when none is up). Two limits, both per healthy worker of
that pool: requests waiting, and prompt tokens waiting. "Waiting" is the larger of this gateway's
own count (exact, immediate) and what the workers last reported (which includes other gateways'
requests, but lags by a poll).

Two priority classes. `batch` is admitted only while the queue is below `batch_share` of its
limits, so it is shed first and can never take the share of slots kept for `interactive` work.
KV capacity on the decode side is checked when the request is routed (the scheduler's kv-fit
filter), which also answers 429.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from common.settings import AdmissionSettings
from gateway.errors import APIError
from gateway.metrics import WAITING
from gateway.registry import WorkerRegistry

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")


class Admission:
    def __init__(self, settings: AdmissionSettings, registry: WorkerRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.waiting = 0  # admitted requests of this gateway without a first token yet
        self.waiting_tokens = 0

    @contextmanager
    def ticket(self, prompt_tokens: int, priority: Priority) -> Iterator[None]:
        """Hold a place in the queue until the first token (leave the block then) or a failure."""
        self.check(prompt_tokens, priority)
        self.waiting += 1
        self.waiting_tokens += prompt_tokens
        WAITING.set(self.waiting)
        try:
            yield
        finally:
            self.waiting -= 1
            self.waiting_tokens -= prompt_tokens
            WAITING.set(self.waiting)

    def check(self, prompt_tokens: int, priority: Priority) -> None:
        pool = self.registry.healthy("prefill") or self.registry.healthy("decode")
        if not pool:
            return  # routing answers 503 with the reason
        reported = sum(w.stats.waiting for w in pool if w.stats)
        share = 1.0 if priority == "interactive" else self.settings.batch_share
        max_requests = share * self.settings.max_waiting_per_worker * len(pool)
        max_tokens = share * self.settings.max_queued_prompt_tokens_per_worker * len(pool)
        if max(self.waiting, reported) + 1 > max_requests:
            self._reject(priority, "queue_full", f"{max(self.waiting, reported)} requests are waiting to start")
        # A prompt larger than the whole token budget is still admitted into an empty queue.
        if self.waiting_tokens and self.waiting_tokens + prompt_tokens > max_tokens:
            self._reject(priority, "queue_full", f"{self.waiting_tokens} prompt tokens are waiting to be prefilled")

    def _reject(self, priority: Priority, code: str, why: str) -> None:
        raise APIError(
            429,
            f"the server is at capacity ({why}; {priority} priority); retry after {self.settings.retry_after_s:g}s",
            "server_overloaded",
            code=code,
            retry_after=self.settings.retry_after_s,
        )
