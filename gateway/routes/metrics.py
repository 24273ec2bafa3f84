"""Prometheus metrics of model routes, by route and variant (both bounded by the operator's routes)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gateway.metrics import _BUCKETS, _TPOT_BUCKETS  # the same buckets as the gateway's own TTFT/TPOT

ROUTE_REQUESTS = Counter(
    "kvrelay_gateway_route_requests_total",
    "Requests to a route by the variant that served them and how they ended (ok, error)",
    ["route", "variant", "outcome"],
)
ROUTE_TTFT = Histogram(
    "kvrelay_gateway_route_time_to_first_token_seconds",
    "Arrival to first token, by route and variant",
    ["route", "variant"],
    buckets=_BUCKETS,
)
ROUTE_TPOT = Histogram(
    "kvrelay_gateway_route_time_per_output_token_seconds",
    "Mean gap between output tokens of a request, by route and variant",
    ["route", "variant"],
    buckets=_TPOT_BUCKETS,
)
ROUTE_ROLLBACKS = Counter(
    "kvrelay_gateway_route_rollbacks_total",
    "Variants the SLO judge rolled back (counted by the replica whose write landed)",
    ["route", "variant"],
)
ROUTE_PROMOTIONS = Counter(
    "kvrelay_gateway_route_promotions_total",
    "Promotion steps the SLO judge took (counted by the replica whose write landed)",
    ["route", "variant"],
)
ROUTE_WEIGHT = Gauge("kvrelay_gateway_route_weight", "Each variant's current weight", ["route", "variant"])
SHADOW_REQUESTS = Counter(
    "kvrelay_gateway_route_shadow_requests_total",
    "Copies of requests sent to a route's shadow model, by outcome (ok, error; dropped: too many running)",
    ["route", "outcome"],
)
