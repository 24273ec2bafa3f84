"""What the planner reads from the gateways' /metrics: each pool's gauges, and the TTFT and TPOT
95th percentiles over the interval between two scrapes.

The latency histograms are cumulative since each gateway started, so percentiles of the raw
buckets would describe a gateway's whole life. The difference of two scrapes describes only the
last interval, which is what a scaling decision must react to."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

ROLES = ("prefill", "decode")
TTFT = "kvrelay_gateway_time_to_first_token_seconds"
TPOT = "kvrelay_gateway_time_per_output_token_seconds"
_POOL_GAUGES = {
    "kvrelay_gateway_workers_up": "workers_up",
    "kvrelay_gateway_pool_running": "running",
    "kvrelay_gateway_pool_waiting": "waiting",
    "kvrelay_gateway_pool_kv_usage_ratio": "kv_usage",
}

Buckets = dict[float, float]
"""A histogram as upper bound (`le`) -> cumulative count, summed over its label sets."""


@dataclass(frozen=True)
class PoolSignals:
    """One pool as a gateway sees it: its healthy workers and what they run and queue."""

    workers_up: int
    running: float
    waiting: float
    kv_usage: float


@dataclass(frozen=True)
class Scrape:
    """One gateway's /metrics, reduced to what the planner uses."""

    pools: dict[str, PoolSignals]
    ttft: Buckets
    tpot: Buckets


@dataclass(frozen=True)
class Signals:
    """One tick's view of the deployment, combined over every gateway that answered."""

    pools: dict[str, PoolSignals]
    ttft_p95: float | None
    tpot_p95: float | None
    requests: int  # first tokens served in the window


def parse(text: str) -> Scrape:
    """Reduce a /metrics text to a Scrape. A pool appears only when all four of its gauges do:
    a gateway that exports some of them is too old (or too new) to be trusted with scaling."""
    gauges: dict[str, dict[str, float]] = {}
    hists: dict[str, Buckets] = {TTFT: {}, TPOT: {}}
    for family in text_string_to_metric_families(text):
        if family.name in _POOL_GAUGES:
            field = _POOL_GAUGES[family.name]
            for s in family.samples:
                if s.name == family.name and "role" in s.labels:
                    gauges.setdefault(s.labels["role"], {})[field] = s.value
        elif family.name in hists:
            buckets = hists[family.name]
            for s in family.samples:
                if s.name == family.name + "_bucket":
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
    pools = {
        role: PoolSignals(int(g["workers_up"]), g["running"], g["waiting"], g["kv_usage"])
        for role, g in gauges.items()
        if len(g) == len(_POOL_GAUGES)
    }
    return Scrape(pools, hists[TTFT], hists[TPOT])


def window(before: Buckets | None, after: Buckets) -> Buckets:
    """The observations made between two scrapes of one gateway. A count that went down means the
    gateway restarted in between: then everything it has seen since is the window."""
    if before is None:
        return dict(after)
    if before.keys() != after.keys() or any(after[le] < before[le] for le in after):
        return dict(after)
    return {le: after[le] - before[le] for le in after}


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile, interpolated linearly within its bucket as Prometheus' histogram_quantile
    does (and, like it, the highest finite bound when the rank falls in the +Inf bucket). None
    when the histogram holds no observation."""
    items = sorted(buckets.items())
    if not items or items[-1][0] != math.inf or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    lower, below = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if le == math.inf:
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def combine(current: Mapping[str, Scrape], previous: Mapping[str, Scrape] | None) -> Signals:
    """One Signals from several gateways (keyed by URL).

    The gauges of each gateway describe the same pools, so the largest view wins: a gateway that
    is starting, or that lost touch with some workers, reports too little, never too much.
    Histograms are summed bucket by bucket, each windowed against the same gateway's previous
    scrape; a gateway without one contributes nothing yet. `previous=None` takes everything each
    gateway has seen since it started (a one-off look has no earlier scrape)."""
    pools = {}
    for role in ROLES:
        views = [s.pools[role] for s in current.values() if role in s.pools]
        if views:
            pools[role] = PoolSignals(
                max(v.workers_up for v in views),
                max(v.running for v in views),
                max(v.waiting for v in views),
                max(v.kv_usage for v in views),
            )
    ttft: Buckets = {}
    tpot: Buckets = {}
    for url, scrape in current.items():
        if previous is not None and url not in previous:
            continue
        before = previous[url] if previous is not None else None
        _add(ttft, window(before.ttft if before else None, scrape.ttft))
        _add(tpot, window(before.tpot if before else None, scrape.tpot))
    requests = int(ttft.get(math.inf, 0.0))
    return Signals(pools, quantile(0.95, ttft), quantile(0.95, tpot), requests)


def _add(total: Buckets, part: Buckets) -> None:
    for le, count in part.items():
        total[le] = total.get(le, 0.0) + count
