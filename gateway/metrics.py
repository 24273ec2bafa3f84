"""The gateway's Prometheus metrics (served at /metrics on its HTTP port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
# End to end: a long generation on a slow pool can take many minutes.
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

INFO = Gauge("kvrelay_gateway_info", "Always 1: what this gateway serves", ["model", "version"])
HTTP_REQUESTS = Counter(
    "kvrelay_gateway_http_requests_total", "Every HTTP request by route and status", ["route", "status"]
)
REQUESTS = Counter(
    "kvrelay_gateway_requests_total",
    "Generation requests by how they ended (ok, client_error, cancelled, overloaded, worker_lost, timeout, "
    "server_error) and finish reason",
    ["model", "outcome", "finish_reason"],
)
PHASES = Histogram(
    "kvrelay_gateway_phase_seconds",
    "Where a request's time went, from the gateway: tokenize, admission, schedule, prefill (to the first "
    "token), decode (to the last), respond",
    ["phase"],
    buckets=_PHASE_BUCKETS,
)
TTFT = Histogram(
    "kvrelay_gateway_time_to_first_token_seconds", "Arrival to first token", ["model", "mode"], buckets=_BUCKETS
)
TPOT = Histogram(
    "kvrelay_gateway_time_per_output_token_seconds",
    "Mean gap between output tokens of a request",
    ["model", "mode"],
    buckets=_TPOT_BUCKETS,
)
E2E = Histogram(
    "kvrelay_gateway_request_duration_seconds", "Arrival to last token", ["model", "mode"], buckets=_E2E_BUCKETS
)
PROMPT_TOKENS = Counter("kvrelay_gateway_prompt_tokens_total", "Prompt tokens of served requests", ["model"])
OUTPUT_TOKENS = Counter("kvrelay_gateway_output_tokens_total", "Tokens generated for clients", ["model"])
TOKEN_GAP = Gauge(
    "kvrelay_gateway_stream_max_token_gap_seconds",
    "Over the requests being served, the longest time since one last received a token (0 when none runs)",
)
RUNNING = Gauge("kvrelay_gateway_requests_running", "Requests being served")
WORKERS_UP = Gauge("kvrelay_gateway_workers_up", "Workers answering health checks", ["role"])
# What each pool is doing, from the Stats the gateway polls: the signals the pool planner and
# KEDA scale on (gateway/planner/).
POOL_RUNNING = Gauge("kvrelay_gateway_pool_running", "Sequences running on the pool's healthy workers", ["role"])
POOL_WAITING = Gauge("kvrelay_gateway_pool_waiting", "Sequences queued on the pool's healthy workers", ["role"])
POOL_KV_USAGE = Gauge(
    "kvrelay_gateway_pool_kv_usage_ratio", "Mean fraction of KV blocks in use over the pool's healthy workers", ["role"]
)
ROUTED = Counter("kvrelay_gateway_routed_total", "Requests by serving mode", ["mode"])
DECISIONS = Counter("kvrelay_gateway_schedule_decisions_total", "Routing decisions", ["outcome", "reason"])
CHOSEN = Counter(
    "kvrelay_gateway_scheduled_worker_total",
    "Requests scheduled onto each worker (bounded by pool size)",
    ["role", "worker"],
)
PREFIX_TOKENS = Counter(
    "kvrelay_gateway_prefix_cached_tokens_total",
    "Prompt tokens the scheduler predicted cached on the chosen worker, and those the worker reported",
    ["kind"],
)
KV_EVENT_RESYNCS = Counter(
    "kvrelay_gateway_kv_event_resyncs_total", "Prefix-index views rebuilt from a snapshot after an event gap"
)
RETRIES = Counter(
    "kvrelay_gateway_retries_total", "Requests re-routed because a worker was unavailable before the first token"
)
MIGRATIONS = Counter(
    "kvrelay_gateway_migrations_total",
    "Running streams moved to another worker after theirs failed, by reason",
    ["reason"],
)
REJECTED = Counter(
    "kvrelay_gateway_rejected_total", "Requests refused with 429 by admission control", ["priority", "reason"]
)
WAITING = Gauge("kvrelay_gateway_requests_waiting", "Admitted requests waiting for their first token")
