"""A worker's span split into named phases that add up to it: each phase runs from one moment to
the next on one clock (time.monotonic), so nothing in the span is left unattributed. The phases
go on the span as `kvrelay.phase.<name>_seconds` and into their histograms."""

from __future__ import annotations

import time

from opentelemetry import trace


class PhaseTimer:
    def __init__(self) -> None:
        self.start = self._mark = time.monotonic()
        self.phases: dict[str, float] = {}

    def until(self, phase: str, moment: float | None = None) -> float:
        """Close `phase` at `moment` (default: now); returns its length. A moment the engine stamped
        earlier than the previous mark (clock order across threads) counts as zero."""
        moment = time.monotonic() if moment is None else max(moment, self._mark)
        seconds = moment - self._mark
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        self._mark = moment
        return seconds

    def record(self, span: trace.Span) -> None:
        span.set_attributes({f"kvrelay.phase.{name}_seconds": s for name, s in self.phases.items()})
