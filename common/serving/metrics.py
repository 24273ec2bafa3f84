"""Prometheus metrics of a worker process, served on its own HTTP port.

Each request's time on a worker is split into phases, one histogram each (per role):
queue (arrival to admission; on a decode worker also the wait for free KV blocks), prefill
(compute to the first token), KV export (prefill role: first token to the handle, the pin wait),
transfer (decode role: the pull), decode (first token, or import, to the last token).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.tracing.setup import kvrelay_version

if TYPE_CHECKING:  # the pool imports the engine; metrics are imported by servicers the pool serves
    from common.serving.model_pool import ModelPool

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DECODE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# A pull over RDMA between GPUs of one node takes tens of microseconds; over gRPC on CPU, seconds.
_TRANSFER_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
_BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(13))  # 1 KiB .. 16 GiB

MODEL_LOAD_SECONDS = Histogram(
    "kvrelay_worker_model_load_seconds",
    "Time to load a model (read, dequantize, pack, allocate its KV cache), evictions before it excluded",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
INFO = Gauge("kvrelay_worker_info", "Always 1: who this worker is", ["worker_id", "role", "model", "version"])
REQUESTS = Counter("kvrelay_worker_requests_total", "Requests handled by this worker", ["role", "rpc", "outcome"])
TTFT = Histogram(
    "kvrelay_worker_time_to_first_token_seconds",
    "Arrival to first token, on the worker",
    ["role"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE = Histogram(
    "kvrelay_worker_request_queue_seconds",
    "Arrival to admission into the running batch (decode: includes the wait for free KV blocks)",
    ["role"],
    buckets=_PHASE_BUCKETS,
)
PREFILL = Histogram(
    "kvrelay_worker_request_prefill_seconds",
    "Prefill compute, admission to first token",
    ["role"],
    buckets=_PHASE_BUCKETS,
)
EXPORT = Histogram(
    "kvrelay_worker_kv_export_seconds",
    "Prefill role: first token to the KV handle being ready (blocks pinned for the pull)",
    buckets=_PHASE_BUCKETS,
)
DECODE = Histogram(
    "kvrelay_worker_request_decode_seconds",
    "First token (or KV import) to the last token",
    ["role"],
    buckets=_DECODE_BUCKETS,
)
KV_CACHE_FULL_WAITS = Counter(
    "kvrelay_worker_kv_cache_full_waits_total", "Requests that had to wait for free KV blocks", ["role"]
)
TRANSFER_BYTES = Histogram("kvrelay_kv_transfer_bytes", "KV bytes of one pull", ["backend"], buckets=_BYTES_BUCKETS)
TRANSFER_SECONDS = Histogram(
    "kvrelay_kv_transfer_seconds", "Duration of one request's KV pull", ["backend"], buckets=_TRANSFER_BUCKETS
)
TRANSFER_FAILURES = Counter(
    "kvrelay_kv_transfer_failures_total",
    "Failed KV transfers by reason: pull (reading the blocks), release, lease (expired before the pull "
    "finished), layout (incompatible KV layouts)",
    ["backend", "reason"],
)


_ENGINE_COUNTERS = (
    ("kvrelay_worker_prefix_cache_queries", "prefix_query_tokens", "Prompt tokens looked up in the prefix cache"),
    ("kvrelay_worker_prefix_cache_hits", "prefix_hit_tokens", "Prompt tokens found in the prefix cache"),
    ("kvrelay_worker_preemptions", "preemptions", "Running requests preempted for KV blocks (recomputed later)"),
    ("kvrelay_worker_aborts", "aborts", "Requests stopped before they finished (client gone, failed pull)"),
    ("kvrelay_worker_kv_lease_expiries", "lease_expiries", "Pinned prefill KV freed because its lease ran out"),
)


class EngineCollector(Collector):
    """Reads each loaded model's engine counters at scrape time (plain ints: safe to read from another
    thread), labelled by model, and what the worker's model pool did (loads, evictions, bytes)."""

    def __init__(self, pool: ModelPool, role: str) -> None:
        self.pool = pool
        self.role = role

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engines = {m: e.stats_now() for m, e in self.pool.engines().items()}
        blocks = GaugeMetricFamily(
            "kvrelay_worker_kv_blocks", "KV cache blocks by state", labels=["role", "model", "state"]
        )
        usage = GaugeMetricFamily(
            "kvrelay_worker_kv_usage_ratio", "Fraction of KV blocks in use", labels=["role", "model"]
        )
        reqs = GaugeMetricFamily(
            "kvrelay_worker_engine_requests", "Requests in the engine by state", labels=["role", "model", "state"]
        )
        counters = {name: CounterMetricFamily(name, doc, labels=["role", "model"]) for name, _, doc in _COUNTERS}
        for model, s in engines.items():
            used = s["total_blocks"] - s["free_blocks"]
            for state, value in (("used", used), ("free", s["free_blocks"]), ("cached", s["cached_blocks"])):
                blocks.add_metric([self.role, model, state], value)
            usage.add_metric([self.role, model], used / max(1, s["total_blocks"]))
            for state in ("waiting", "running", "pinned"):
                reqs.add_metric([self.role, model, state], s[state])
            for name, key, _ in _COUNTERS:
                counters[name].add_metric([self.role, model], s[key])
        yield from (blocks, usage, reqs, *counters.values())
        yield from self._pool_metrics()

    def _pool_metrics(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        loaded = GaugeMetricFamily("kvrelay_worker_model_loaded", "1 if the model is loaded now", labels=["model"])
        size = GaugeMetricFamily(
            "kvrelay_worker_model_bytes", "Weights and KV cache of the model (estimated until loaded)", labels=["model"]
        )
        loads = CounterMetricFamily("kvrelay_worker_model_loads", "Times the model was loaded", labels=["model"])
        evictions = CounterMetricFamily(
            "kvrelay_worker_model_evictions", "Times the model was evicted for another", labels=["model"]
        )
        for model, k in self.pool.known.items():
            loaded.add_metric([model], 1.0 if model in self.pool.loaded else 0.0)
            size.add_metric([model], k.footprint_bytes)
            loads.add_metric([model], k.loads)
            evictions.add_metric([model], k.evictions)
        budget = GaugeMetricFamily(
            "kvrelay_worker_memory_budget_bytes", "Memory the worker's models may take (0: no budget)"
        )
        budget.add_metric([], self.pool.budget_bytes or 0)
        yield from (loaded, size, loads, evictions, budget)


_COUNTERS = (
    ("kvrelay_worker_prefix_cache_queries", "prefix_query_tokens", "Prompt tokens looked up in the prefix cache"),
    ("kvrelay_worker_prefix_cache_hits", "prefix_hit_tokens", "Prompt tokens found in the prefix cache"),
    ("kvrelay_worker_preemptions", "preemptions", "Running requests preempted for KV blocks (recomputed later)"),
    ("kvrelay_worker_aborts", "aborts", "Requests stopped before they finished (client gone, failed pull)"),
    ("kvrelay_worker_kv_lease_expiries", "lease_expiries", "Pinned prefill KV freed because its lease ran out"),
)


def serve_metrics(pool: ModelPool, role: str, worker_id: str, host: str, port: int) -> int:
    """Serve /metrics; returns the port (a free one when `port` is 0)."""
    INFO.labels(worker_id, role, pool.default, kvrelay_version()).set(1)
    REGISTRY.register(EngineCollector(pool, role))
    httpd, _ = start_http_server(port, addr=host)
    return httpd.server_port
