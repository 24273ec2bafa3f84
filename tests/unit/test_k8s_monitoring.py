"""A cluster with the Prometheus Operator and KEDA picks up the same rules, the same scrape jobs and
real metrics: the PrometheusRule carries exactly the rules file's groups, the PodMonitors produce the
job names the compose Prometheus uses, no rule filters on a job that does not exist, and every
metric a KEDA trigger or a pod annotation points at is one the services export."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.unit.test_k8s_render import by_kind, container, pod_templates, render

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "base" / "observability" / "prometheus-rules.yaml"
COMPOSE_PROMETHEUS = ROOT / "k8s" / "base" / "observability" / "prometheus.yaml"
PROMETHEUS_RULE = ROOT / "k8s" / "components" / "prometheus-operator" / "prometheus-rule.yaml"


def gateway_metric_names() -> set[str]:
    """Every series name the gateway can export (histogram and counter suffixes included)."""
    import prometheus_client

    import gateway.metrics  # noqa: F401 - registers the gateway's metrics

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum"))
        names.update(s.name for s in family.samples)
    return names


def rendered_job_names() -> dict[str, str]:
    """PodMonitor name -> the job label its relabelling sets."""
    jobs = {}
    for name, pm in by_kind(render("cpu+prometheus-operator"), "PodMonitor").items():
        (endpoint,) = pm["spec"]["podMetricsEndpoints"]
        (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        jobs[name] = relabel["replacement"]
    return jobs


def compose_jobs() -> dict[str, dict]:
    return {j["job_name"]: j for j in yaml.safe_load(COMPOSE_PROMETHEUS.read_text())["scrape_configs"]}


def test_the_prometheus_rule_holds_exactly_the_rules_file():
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "regenerate: the command is in the header of " + str(PROMETHEUS_RULE.relative_to(ROOT))
    )
    assert "yq" in PROMETHEUS_RULE.read_text().split("apiVersion")[0], "the header says how it is regenerated"
    rendered = by_kind(render("gpu+prometheus-operator"), "PrometheusRule")["kvrelay"]
    assert rendered["spec"]["groups"] == rule["spec"]["groups"]


def test_pod_monitors_produce_the_compose_job_names():
    jobs = rendered_job_names()
    assert set(jobs.values()) == set(compose_jobs()), "the same job names in compose and in Kubernetes"
    for monitor, job in jobs.items():
        role = job.removeprefix("kvrelay-")
        pm = by_kind(render("cpu+prometheus-operator"), "PodMonitor")[monitor]
        assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": role}


def test_pod_monitors_scrape_the_ports_compose_scrapes():
    docs = render("cpu+prometheus-operator")
    monitors = by_kind(docs, "PodMonitor")
    for monitor, job in rendered_job_names().items():
        role = job.removeprefix("kvrelay-")
        c = container(docs, role)
        (endpoint,) = monitors[monitor]["spec"]["podMetricsEndpoints"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == endpoint["port"])
        compose = compose_jobs()[job]
        compose_port = (
            compose["dns_sd_configs"][0]["port"]
            if "dns_sd_configs" in compose
            else int(compose["static_configs"][0]["targets"][0].rsplit(":", 1)[1])
        )
        assert port == compose_port, f"{job}: k8s scrapes {port}, compose {compose_port}"
        annotations = pod_templates(docs)[role]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), "annotation-based scraping finds the same port"


def test_no_rule_filters_on_a_job_that_does_not_exist():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    jobs = set(rendered_job_names().values())
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    named = {m for e in exprs for m in re.findall(r'\bjob\s*=~?\s*"([^"]+)"', e)}
    assert named <= jobs, f"rules name jobs no scrape config produces: {named - jobs}"
    (worker_down,) = [r for g in groups for r in g["rules"] if r.get("alert") == "KvrelayWorkerDown"]
    # Matched per target on (job, instance): any job, as long as `up` and the worker's series share it.
    assert "on (job, instance)" in worker_down["expr"] and "up == 0" in worker_down["expr"]


def test_keda_queries_read_metrics_the_gateway_exports():
    exported = gateway_metric_names()
    scaled = by_kind(render("cpu+keda"), "ScaledObject")
    used = {}
    for name, so in scaled.items():
        queries = [t["metadata"]["query"] for t in so["spec"]["triggers"]]
        metrics = {m for q in queries for m in re.findall(r"\bkvrelay_[a-z0-9_]+", q)}
        assert metrics <= exported, f"{name}: no such gateway metric: {metrics - exported}"
        roles = {r for q in queries for r in re.findall(r'role="([a-z]+)"', q)}
        assert roles <= {name}, f"ScaledObject {name} reads another pool's gauges: {roles}"
        used[name] = metrics
    assert {"kvrelay_gateway_pool_waiting", "kvrelay_gateway_time_to_first_token_seconds_bucket"} <= used["prefill"]
    assert {"kvrelay_gateway_pool_kv_usage_ratio", "kvrelay_gateway_pool_running"} <= used["decode"]


def test_the_metric_check_would_catch_a_misspelling():
    exported = gateway_metric_names()
    assert "kvrelay_gateway_pool_waiting" in exported
    assert "kvrelay_gateway_pool_waitng" not in exported
