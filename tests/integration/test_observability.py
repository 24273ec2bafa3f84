"""The operators' files against the real services: promtool accepts the alert rules, a real
Prometheus scrapes the gateway and the workers and answers a TTFT quantile after traffic, and every
metric the dashboard and the rules query is one the services export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from kvrelay.launcher import free_port
from tests.waiting import wait_for

OBS = Path(__file__).resolve().parents[2] / "k8s" / "base" / "observability"
_SUFFIXES = ("_bucket", "_count", "_sum")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; run `make setup` (apt-get install -y prometheus)")
    return path


def test_alert_rules_pass_promtool():
    out = subprocess.run(
        [promtool(), "check", "rules", str(OBS / "prometheus-rules.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    names = {
        r.get("alert")
        for g in yaml.safe_load((OBS / "prometheus-rules.yaml").read_text())["groups"]
        for r in g["rules"]
    }
    for wanted in ("KvrelayTTFTBudgetFastBurn", "KvrelayQueueBacklog", "KvrelayKVCacheNearlyFull", "KvrelayWorkerDown",
                   "KvrelayKVTransferFailureRatio", "KvrelayPrefixPredictionDrift", "KvrelayServerErrorRatio",
                   "KvrelayStuckStreams", "KvrelayGatewayAbsent"):  # fmt: skip
        assert wanted in names


def test_collector_config_receives_otlp_and_exports_to_jaeger():
    cfg = yaml.safe_load((OBS / "otel-collector.yaml").read_text())
    pipe = cfg["service"]["pipelines"]["traces"]
    assert pipe["receivers"] == ["otlp"] and set(cfg["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert all(e in cfg["exporters"] for e in pipe["exporters"]) and "jaeger" in pipe["exporters"][0]
    assert all(p in cfg["processors"] for p in pipe["processors"])


def queried_metrics() -> set[str]:
    exprs = [
        t["expr"] for p in json.loads((OBS / "grafana-dashboard.json").read_text())["panels"] for t in p["targets"]
    ]
    for g in yaml.safe_load((OBS / "prometheus-rules.yaml").read_text())["groups"]:
        exprs += [r["expr"] for r in g["rules"]]
    names = set()
    for e in exprs:
        for m in re.findall(r"\bkvrelay_[a-z_]+\b", e):
            for s in _SUFFIXES:
                m = m.removesuffix(s)
            names.add(m)
    return names


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            names.add(name)
            names.add(name.removesuffix("_total"))  # a counter family is listed without _total
    return names


def prometheus_query(base: str, q: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": q}, timeout=5).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


def test_prometheus_scrapes_every_service_and_the_dashboard_matches(tiny_cluster, tmp_path):
    run = tiny_cluster
    model = httpx.get(f"{run.url}/v1/models").json()["data"][0]["id"]
    for i in range(6):
        body = {"model": model, "prompt": f"warm {i}", "max_tokens": 8}
        assert httpx.post(f"{run.url}/v1/completions", json=body, timeout=60).status_code == 200

    metrics_urls = {"gateway": f"{run.url}/metrics"}
    for role, addr in (("prefill", run.prefill[0]), ("decode", run.decode[0])):
        host, port = addr.rsplit(":", 1)
        metrics_urls[role] = f"http://{host}:{int(port) + 1000}/metrics"
    texts = {k: httpx.get(u, timeout=5).text for k, u in metrics_urls.items()}
    have = set().union(*(exported(t) for t in texts.values()))
    missing = {m for m in queried_metrics() if m not in have}
    assert not missing, f"the dashboard or rules query metrics no service exports: {sorted(missing)}"
    for t in texts.values():  # Prometheus naming: counters end in _total, durations in _seconds
        for line in t.splitlines():
            if line.startswith("# TYPE kvrelay_"):
                _, _, name, kind = line.split()
                assert kind != "counter" or name.endswith("_total") or f"{name}_total" in t, name
                assert kind != "histogram" or name.endswith(("_seconds", "_bytes")), name

    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed; run `make setup`"
    port = free_port()
    targets = {k: u.removeprefix("http://").removesuffix("/metrics") for k, u in metrics_urls.items()}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(OBS / "prometheus-rules.yaml")],
        "scrape_configs": [
            {"job_name": f"kvrelay-{k}", "static_configs": [{"targets": [t]}]} for k, t in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        ups: list = []

        def every_target_up() -> bool:
            nonlocal ups
            try:
                ups = prometheus_query(base, "up")
            except httpx.HTTPError:  # not listening yet
                return False
            return len(ups) == 3 and all(u["value"][1] == "1" for u in ups)

        try:
            wait_for(every_target_up, 60, "Prometheus to scrape the gateway and both workers")
        except AssertionError as e:
            raise AssertionError(f"{e}: {ups}\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}") from None
        for i in range(6):  # traffic while Prometheus watches, so rates are non-zero
            body = {"model": model, "prompt": f"scraped {i}", "max_tokens": 8}
            assert httpx.post(f"{run.url}/v1/completions", json=body, timeout=60).status_code == 200
        q = "histogram_quantile(0.99, sum by (le) (rate(kvrelay_gateway_time_to_first_token_seconds_bucket[1m])))"
        res: list = []

        def ttft_known() -> bool:
            nonlocal res
            res = prometheus_query(base, q)
            return bool(res) and res[0]["value"][1] not in ("NaN", "+Inf")

        try:
            wait_for(ttft_known, 60, "Prometheus to answer a TTFT p99")
        except AssertionError as e:
            raise AssertionError(f"{e}: {res}") from None
        assert 0 < float(res[0]["value"][1]) < 60, f"implausible TTFT p99 from Prometheus: {res}"
        assert prometheus_query(base, 'kvrelay_worker_kv_usage_ratio{role="decode"}')
    finally:
        proc.terminate()
        proc.wait(10)
