"""What one generation request came to: its outcome, its finish reason, and where its time went.

Every request gets one `RequestRecord` (created by the observing middleware, reached through
`request.state.record`). The code that knows how the request ended says so (`succeed`, `fail`,
`cancel`); the middleware turns the record into the outcome metric and the root span's attributes
when the response is over, whatever path it took.

The phase clock is a timeline: entering a phase closes the one before, so the named phases cover
the request from arrival to the last byte with no gap and no overlap (a migration re-enters
`schedule`, `prefill` and `decode`; their times add up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PHASES = ("tokenize", "admission", "schedule", "prefill", "decode", "respond")

# Outcomes, in the words of the metric `kvrelay_gateway_requests_total{outcome}`.
OK = "ok"
CLIENT_ERROR = "client_error"  # the request was invalid (4xx other than 429)
CANCELLED = "cancelled"  # the client went away or stopped reading
OVERLOADED = "overloaded"  # refused by admission control (429)
WORKER_LOST = "worker_lost"  # a worker died or failed and no other could finish the request
TIMEOUT = "timeout"  # a worker stalled or a deadline passed
SERVER_ERROR = "server_error"  # anything else on our side
SERVER_SIDE = frozenset({WORKER_LOST, TIMEOUT, SERVER_ERROR})

_WORKER_LOST_CODES = frozenset(
    {"worker_unavailable", "worker_lost", "kv_transfer_failed", "kv_not_found", "worker_error", "worker_incompatible"}
)
_TIMEOUT_CODES = frozenset({"worker_stalled", "timeout", "deadline_exceeded"})


def outcome_of(status: int, code: str | None = None) -> str:
    """The outcome an HTTP status (and the OpenAI error code, when there is one) stands for."""
    if status < 400:
        return OK
    if status == 429:
        return OVERLOADED
    if status == 499:
        return CANCELLED
    if status < 500:
        return CLIENT_ERROR
    if code in _TIMEOUT_CODES or status == 504:
        return TIMEOUT
    if code in _WORKER_LOST_CODES:
        return WORKER_LOST
    return SERVER_ERROR


class PhaseClock:
    def __init__(self, now: float | None = None) -> None:
        self.started = time.perf_counter() if now is None else now
        self.current = PHASES[0]
        self._since = self.started
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def enter(self, phase: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.totals[self.current] += now - self._since
        self.current, self._since = phase, now

    def close(self, now: float | None = None) -> dict[str, float]:
        """Phase durations up to now; the clock keeps running in its current phase."""
        now = time.perf_counter() if now is None else now
        totals = dict(self.totals)
        totals[self.current] += now - self._since
        return totals


@dataclass
class RequestRecord:
    model: str = "unknown"  # the served model's name once the request was accepted (bounded)
    outcome: str | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    clock: PhaseClock = field(default_factory=PhaseClock)
    tokens_used: int = 0  # prompt + output tokens the request consumed (what a tokens/min budget is charged)
    ttft_s: float | None = None  # arrival to first token, once there was one
    tpot_s: float | None = None  # mean time per output token after the first, once the stream ended
    _on_end: list[Callable[[int], None]] = field(default_factory=list)

    def on_end(self, callback: Callable[[int], None]) -> None:
        """Call `callback(tokens_used)` when the response is over, however it ended."""
        self._on_end.append(callback)

    def ended(self) -> None:
        for callback in self._on_end:
            try:
                callback(self.tokens_used)
            except Exception:  # a settling callback must not fail the response's bookkeeping
                log.exception("a request's end-of-request callback failed")

    def succeed(self, finish_reason: str | None) -> None:
        self.outcome = OK
        self.finish_reason = finish_reason

    def fail(self, status: int, code: str | None, message: str) -> None:
        if self.outcome is not None:
            return  # the first word is the true one (a cancel is not overwritten by its echo)
        self.outcome = outcome_of(status, code)
        self.error_type = code or self.outcome
        self.error_message = message
        if self.outcome in SERVER_SIDE:
            self.finish_reason = "error"

    def cancel(self, why: str = "client_disconnected") -> None:
        if self.outcome is None:
            self.outcome = CANCELLED
            self.error_type = why
            self.finish_reason = self.finish_reason or "abort"
