"""Prometheus metrics of a worker process, served on its own HTTP port."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("kvrelay_worker_requests_total", "Requests handled by this worker", ["role", "rpc", "outcome"])
TTFT = Histogram(
    "kvrelay_worker_time_to_first_token_seconds",
    "Arrival to first token, on the worker",
    ["role"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE = Histogram(
    "kvrelay_worker_queue_seconds",
    "Arrival to first admission into the running batch",
    ["role"],
    buckets=_LATENCY_BUCKETS,
)
TRANSFER_BYTES = Counter("kvrelay_kv_transfer_bytes_total", "KV bytes moved into this worker", ["backend"])
TRANSFER_SECONDS = Histogram(
    "kvrelay_kv_transfer_seconds", "Duration of one request's KV pull", ["backend"], buckets=_LATENCY_BUCKETS
)
TRANSFER_FAILURES = Counter("kvrelay_kv_transfer_failures_total", "Failed KV pulls", ["backend"])


class EngineCollector(Collector):
    """Reads the engine's counters at scrape time (plain ints: safe to read from another thread)."""

    def __init__(self, engine: LLMEngine, role: str) -> None:
        self.engine = engine
        self.role = role

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.engine.stats()
        blocks = GaugeMetricFamily("kvrelay_worker_kv_blocks", "KV cache blocks by state", labels=["role", "state"])
        used = s["total_blocks"] - s["free_blocks"]
        for state, value in (("used", used), ("free", s["free_blocks"]), ("cached", s["cached_blocks"])):
            blocks.add_metric([self.role, state], value)
        yield blocks
        usage = GaugeMetricFamily("kvrelay_worker_kv_usage_ratio", "Fraction of KV blocks in use", labels=["role"])
        usage.add_metric([self.role], used / max(1, s["total_blocks"]))
        yield usage
        reqs = GaugeMetricFamily(
            "kvrelay_worker_engine_requests", "Requests in the engine by state", labels=["role", "state"]
        )
        for state in ("waiting", "running", "pinned"):
            reqs.add_metric([self.role, state], s[state])
        yield reqs
        hits = GaugeMetricFamily(
            "kvrelay_worker_prefix_cache_hit_ratio", "Prompt tokens found in the prefix cache", labels=["role"]
        )
        hits.add_metric([self.role], s["prefix_hit_tokens"] / max(1, s["prefix_query_tokens"]))
        yield hits


def serve_metrics(engine: LLMEngine, role: str, host: str, port: int) -> None:
    REGISTRY.register(EngineCollector(engine, role))
    start_http_server(port, addr=host)
