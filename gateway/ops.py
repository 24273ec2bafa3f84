"""The operators' endpoints: liveness, readiness (with each pool's workers), and Prometheus
metrics. On the public port by default; with `internal_port` set, only there (bound to
`internal_host`, loopback by default), since readiness lists the workers and metrics reveal load."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.lifecycle import Lifecycle
from gateway.metrics import POOL_KV_USAGE, POOL_RUNNING, POOL_WAITING, WORKERS_UP
from gateway.registry import WorkerRegistry


async def health() -> dict:
    return {"status": "ok"}


def add_ops_routes(app: FastAPI, registry: WorkerRegistry, lifecycle: Lifecycle) -> None:
    app.get("/health")(health)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if lifecycle.draining:
            return JSONResponse({"ready": False, "mode": "draining", "workers": {}}, status_code=503)
        errors = registry.layout_errors()
        detail = {}
        pools = {}
        for role in ("prefill", "decode"):
            members = [w for w in registry.workers.values() if w.role == role]
            draining = [w for w in members if w.healthy and w.stats and w.stats.draining]
            pools[role] = [w for w in members if w.healthy and w.address not in errors and w not in draining]
            detail[role] = {
                "healthy": [w.worker_id for w in pools[role]],
                "draining": [w.worker_id for w in draining],
                "down": {w.address: w.error for w in members if not w.healthy},
                "incompatible": {w.address: errors[w.address] for w in members if w.address in errors},
                # which models each healthy worker holds in memory now (as of the last Stats poll)
                "loaded": {w.worker_id: sorted(m for m, s in w.models.items() if s.loaded) for w in pools[role]},
            }
        ok = bool(pools["decode"])  # a decode worker can prefill locally, so it alone can serve
        mode = "disaggregated" if pools["prefill"] and ok else ("colocated" if ok else "unavailable")
        return JSONResponse({"ready": ok, "mode": mode, "workers": detail}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        for role in ("prefill", "decode"):
            export_pool_gauges(role, registry)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def export_pool_gauges(role: str, registry: WorkerRegistry) -> None:
    healthy = [w for w in registry.healthy(role) if w.stats is not None]
    WORKERS_UP.labels(role).set(len(registry.healthy(role)))
    POOL_RUNNING.labels(role).set(sum(w.stats.running for w in healthy))
    POOL_WAITING.labels(role).set(sum(w.stats.waiting for w in healthy))
    usage = [1 - w.stats.free_blocks / w.stats.total_blocks for w in healthy if w.stats.total_blocks]
    POOL_KV_USAGE.labels(role).set(sum(usage) / len(usage) if usage else 0.0)
