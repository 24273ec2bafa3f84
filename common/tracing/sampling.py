"""Who decides whether a trace is kept.

Workers follow the caller (parent-based): a request is traced end to end or not at all.

The gateway is the edge, and decides for every trace that reaches it:
- By default a client's `traceparent` only links the trace; its sampled flag does not force
  recording (a client could otherwise make every request expensive). `trust_client_sampling`
  restores W3C parent-based behaviour for deployments whose callers are trusted.
- New traces are kept at `sample_ratio` (by trace id, so every replica agrees).
- With `keep_errors_and_slow` and a ratio below 1, a trace not picked by the ratio is still
  *recorded* at the gateway (cheap: its spans stay in memory until the request ends); when the
  request fails or is slow, its gateway spans are exported anyway (see `TailKeeper`). Workers were
  told "not sampled", so such a trace holds the gateway's spans only: enough to see which worker,
  which phase, and why; rerun with the ratio at 1 to see inside the workers.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes


class EdgeSampler(Sampler):
    def __init__(self, ratio: float, trust_client: bool, record_unsampled: bool) -> None:
        self._ratio = TraceIdRatioBased(ratio)
        self.trust_client = trust_client
        self._unsampled = Decision.RECORD_ONLY if record_unsampled else Decision.DROP

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state=None,  # noqa: ANN001 - the SDK's signature
    ) -> SamplingResult:
        parent_span = get_current_span(parent_context)
        parent = parent_span.get_span_context()
        if parent.is_valid and (not parent.is_remote or self.trust_client):
            # A span inside the gateway, or a trusted caller: the parent's decision holds.
            if parent.trace_flags.sampled:
                decision = Decision.RECORD_AND_SAMPLE
            elif not parent.is_remote and parent_span.is_recording():
                decision = self._unsampled  # a child of a recorded-only root: kept or not with it
            else:
                decision = Decision.DROP if parent.is_remote else self._unsampled
        else:
            decision = self._ratio.should_sample(parent_context, trace_id, name).decision
            if decision is not Decision.RECORD_AND_SAMPLE:
                decision = self._unsampled
        return SamplingResult(
            decision,
            attributes if decision is not Decision.DROP else None,
            parent.trace_state if parent.is_valid else None,
        )

    def get_description(self) -> str:
        return f"EdgeSampler{{{self._ratio.get_description()}, trust_client={self.trust_client}}}"
