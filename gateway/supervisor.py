"""The one owner of retries and migrations: a request is served by attempts, each over one route,
until one finishes it or the budget (attempts, deadline) is spent.

- A failure before any token reached the client is a *retry*: route again, avoiding the worker
  that failed.
- A failure after tokens were sent (the decode worker died, stalled, or failed its step; the
  prefill worker died before the KV was pulled) is a *migration*: the prompt plus every token
  already sent is prefilled again on another route (a prefill worker, or a decode worker
  locally; the prefix cache usually holds most of it) and decoding continues there. The client
  sees one stream; no token is repeated or missing, and usage counts each token once.

With greedy sampling the migrated output is token for token the uninterrupted one. A seeded
sampled request continues from a generator seeded anew, so its tokens after the migration point
are reproducible (same seed, same failure point: same tokens) but differ from an uninterrupted run.
A stop string that spans the migration point is still cut by the gateway's detokenizer, but the new
worker does not see it, so generation may run on (unsent) until max_tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from opentelemetry import trace

from common.settings import MigrationSettings
from gateway.errors import APIError, WorkerFailure
from gateway.metrics import MIGRATIONS, PREFIX_TOKENS, RETRIES
from gateway.orchestrator import Delta, Orchestrator, Route
from gateway.registry import WorkerRegistry
from gateway.request_record import PhaseClock
from gateway.scheduling.types import ANYWHERE, Placement

log = logging.getLogger(__name__)

# Failures that say the worker itself is gone: stop routing to it until a poll finds it again.
_WORKER_GONE = frozenset({"worker_unavailable", "worker_lost", "worker_stalled"})


@dataclass
class Outcome:
    """What serving one request came to, for the response headers, metrics and the span."""

    route: Route | None = None  # the route of the last attempt
    first_route: Route | None = None
    attempts: int = 0
    retries: list[str] = field(default_factory=list)  # reasons
    migrations: list[str] = field(default_factory=list)
    transfer: dict = field(default_factory=dict)  # the last KV transfer's figures
    clock: PhaseClock = field(default_factory=PhaseClock)  # the request's phases (gateway/request_record.py)


class Supervisor:
    def __init__(self, orchestrator: Orchestrator, registry: WorkerRegistry, budget: MigrationSettings) -> None:
        self.orchestrator = orchestrator
        self.registry = registry
        self.budget = budget

    async def serve(
        self,
        request_id: str,
        prompt_ids: list[int],
        params,  # noqa: ANN001 - SamplingParams
        outcome: Outcome,
        placement: Placement = ANYWHERE,
    ) -> AsyncIterator[Delta]:
        """Deltas of the whole request, across attempts; raises the last failure when the budget is spent."""
        span = trace.get_current_span()
        deadline = time.monotonic() + self.budget.deadline_s
        sent: list[int] = []  # tokens already yielded to the client
        cached: int | None = None
        avoid: set[str] = set()
        failure: WorkerFailure | None = None  # the last one, when retrying or migrating
        while True:
            attempt_id = request_id if outcome.attempts == 0 else f"{request_id}~{outcome.attempts}"
            remaining = dataclasses.replace(
                params, max_tokens=params.max_tokens - len(sent), prior_output_tokens=len(sent)
            )
            outcome.clock.enter("schedule")
            try:
                route = self._route(prompt_ids + sent, avoid, params.cache_salt, placement)
            except APIError as e:
                if failure is None:
                    raise
                # What ended the request is the worker that failed it; nowhere to go is the detail.
                raise WorkerFailure(
                    failure.status,
                    f"{failure.message}; no other worker could take the request over ({e.message})",
                    failure.worker,
                    failure.stage,
                    failure.code or "worker_lost",
                ) from e
            outcome.clock.enter("prefill")  # to this attempt's first token (a local prefill, or the prefill worker)
            outcome.route = route
            outcome.first_route = outcome.first_route or route
            outcome.attempts += 1
            try:
                deltas = self.orchestrator.attempt(attempt_id, prompt_ids + sent, remaining, route, placement)
                async with aclosing(deltas):
                    async for d in deltas:
                        if outcome.clock.current == "prefill":
                            outcome.clock.enter("decode")
                        if cached is None:
                            cached = d.cached_tokens
                            PREFIX_TOKENS.labels("predicted").inc(route.predicted_cached_tokens)
                            PREFIX_TOKENS.labels("actual").inc(cached)
                        if d.transfer:
                            outcome.transfer = d.transfer
                        yield self._as_one_stream(d, prompt_ids, sent, cached, migrated=bool(outcome.migrations))
                        sent += d.token_ids
                        if d.finished:
                            return
            except WorkerFailure as e:
                if not e.recoverable or outcome.attempts >= self.budget.max_attempts or time.monotonic() > deadline:
                    raise
                if e.code in _WORKER_GONE:
                    self.registry.mark_down(e.worker, e.message)
                avoid.add(e.worker)
                failure = e
                self._record(span, outcome, e, len(sent))

    def _route(self, prompt_ids: list[int], avoid: set[str], cache_salt: str, placement: Placement) -> Route:
        """Avoiding the workers that failed this request is a preference: when no other worker can
        take it, one of them may (a failed pull, say, need not be the decode worker's fault)."""
        try:
            return self.orchestrator.route(prompt_ids, frozenset(avoid), cache_salt, placement)
        except APIError as e:
            if not avoid or e.code != "no_workers":
                raise
        return self.orchestrator.route(prompt_ids, cache_salt=cache_salt, placement=placement)

    @staticmethod
    def _as_one_stream(d: Delta, prompt_ids: list[int], sent: list[int], cached: int, migrated: bool) -> Delta:
        """An attempt's delta as part of the client's one stream: usage counts the original prompt
        and every token once; after a migration the worker's stop-cut text covers only its own
        tokens, so the gateway cuts the text itself."""
        if not migrated:
            return d
        return dataclasses.replace(
            d,
            text=None if migrated else d.text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(sent) + len(d.token_ids) if d.finished else d.completion_tokens,
            cached_tokens=cached,
        )

    @staticmethod
    def _record(span: trace.Span, outcome: Outcome, e: WorkerFailure, sent: int) -> None:
        kind = "migrate" if sent else "retry"
        attrs = {
            f"kvrelay.{kind}.reason": e.code or "",
            f"kvrelay.{kind}.stage": e.stage,
            f"kvrelay.{kind}.worker": e.worker,
            f"kvrelay.{kind}.tokens_sent": sent,
            f"kvrelay.{kind}.attempt": outcome.attempts,
        }
        span.add_event(kind, attrs)
        if sent:
            outcome.migrations.append(e.code or "")
            MIGRATIONS.labels(e.code or "unknown").inc()
            log.warning("migrating a stream after %d tokens: %s", sent, e.message)
        else:
            outcome.retries.append(e.code or "")
            RETRIES.inc()
            log.warning("retrying a request elsewhere: %s", e.message)
