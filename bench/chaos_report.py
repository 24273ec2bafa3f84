"""The chaos benchmark's report: counts, latencies of what completed, the gateway's own migration
and retry counters, leaks, and whether each target is met (printed, and in the JSON)."""

from __future__ import annotations

import os

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from bench.chaos_workload import Tally
from bench.loadgen import percentile

# metric sample -> report key; a counter the gateway does not (yet) export reads as 0
COUNTERS = {
    "kvrelay_gateway_migrations_total": "migrated",
    "kvrelay_gateway_retries_total": "retried",
    "kvrelay_gateway_requests_running": "gateway_running_after",
}


async def gateway_counters(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """Each of COUNTERS summed over its labels (e.g. migrations by reason)."""
    text = (await client.get(f"{url}/metrics")).text
    totals = dict.fromkeys(COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in COUNTERS:
                totals[COUNTERS[s.name]] += s.value
    return totals


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)  # NaN (nothing measured) is not JSON


def report(
    tally: Tally, kills: list[dict], leaked: int, dirty: list[dict], counters: dict[str, float], duration_s: float
) -> dict:
    ok = [s for s in tally.samples if not s.error and s.tokens]
    ttft = [s.ttft for s in ok]
    tpot = [t for s in ok if (t := s.tpot) is not None]
    ratio = tally.completed / tally.accepted if tally.accepted else None
    targets = {
        "failed == 0": tally.failed == 0,
        "token_mismatches == 0": tally.token_mismatches == 0,
        "leaked_blocks == 0": leaked == 0 and not any("error" in d for d in dirty),
        "completed/accepted >= 0.99": ratio is not None and ratio >= 0.99,
    }
    result = {
        "accepted": tally.accepted,
        "completed": tally.completed,
        "failed": tally.failed,
        "migrated": int(counters["migrated"]),
        "retried": int(counters["retried"]),
        "rejected_429": tally.rejected_429,
        "token_mismatches": tally.token_mismatches,
        "leaked_blocks": leaked,
        "p99_ttft_s": _r(percentile(ttft, 0.99)),
        "p99_tpot_s": _r(percentile(tpot, 0.99)),
        "p50_ttft_s": _r(percentile(ttft, 0.5)),
        "p50_tpot_s": _r(percentile(tpot, 0.5)),
        "sent": tally.sent,
        "completed_over_accepted": _r(ratio) if ratio is not None else None,
        "unchecked": tally.unchecked,
        "by_kind": tally.by_kind,
        "errors": dict(sorted(tally.errors.items(), key=lambda kv: -kv[1])[:5]),
        "mismatch_examples": tally.mismatch_examples,
        "not_clean_after_settle": dirty,
        "gateway_running_after": int(counters["gateway_running_after"]),
        "kills": sum("killed" in k for k in kills),
        "crashes": sum("crashed" in k for k in kills),
        "kill_log": kills,
        "duration_s": round(duration_s, 1),
        "cores": os.cpu_count(),
        "targets": targets,
        "targets_met": all(targets.values()),
    }
    _print(result)
    return result


def _print(result: dict) -> None:
    table = Table(title="kvrelay bench chaos")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in ("accepted", "completed", "failed", "rejected_429", "token_mismatches", "leaked_blocks"):
        table.add_row(key, str(result[key]))
    for key in ("migrated", "retried", "kills", "p99_ttft_s", "p99_tpot_s"):
        table.add_row(key, str(result[key]))
    for name, met in result["targets"].items():
        table.add_row(f"target {name}", "[green]met" if met else "[red]NOT met")
    Console(stderr=True).print(table)
