"""The NetworkPolicies open exactly the paths the deployment uses. A small evaluator of the
NetworkPolicy ingress rules (selectors, namespaces, ports and port ranges, named ports) asks, for
each path, whether a connection from a given source to a given pod port is allowed, on the
rendered manifests; paths that must stay closed are asked too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.unit.test_k8s_render import by_kind, container, pod_templates, render

NAMESPACE = "kvrelay"


@dataclass(frozen=True)
class Source:
    """Where a connection comes from: a pod (labels) in a namespace, or outside the cluster."""

    namespace: str | None
    labels: dict[str, str] = field(default_factory=dict)


EXTERNAL = Source(None)
MONITORING = Source("monitoring", {"app.kubernetes.io/name": "prometheus"})
STRANGER = Source(NAMESPACE, {"app": "something-else"})


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], src: Source) -> bool:
    if src.namespace is None:  # outside the cluster: only ipBlocks (none here) match
        return False
    ns_labels = {"kubernetes.io/metadata.name": src.namespace}
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif src.namespace != NAMESPACE:  # a bare podSelector means this namespace
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], src.labels)


def port_matches(rule_port: dict[str, Any], port: int, named: dict[str, int]) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    p = rule_port.get("port")
    if p is None:
        return True
    p = named.get(p, -1) if isinstance(p, str) else p
    return p <= port <= rule_port.get("endPort", p)


def allowed(docs: tuple[dict, ...], src: Source, target: str, port: int) -> bool:
    pod = pod_templates(docs)[target]
    labels = pod["metadata"]["labels"]
    named = {
        p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if "name" in p
    }
    policies = [
        p["spec"]
        for p in by_kind(docs, "NetworkPolicy").values()
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    for spec in policies:
        for rule in spec.get("ingress", []):
            peers_ok = "from" not in rule or any(peer_matches(peer, src) for peer in rule["from"])
            ports_ok = "ports" not in rule or any(port_matches(rp, port, named) for rp in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


def pod(docs: tuple[dict, ...], name: str) -> Source:
    return Source(NAMESPACE, pod_templates(docs)[name]["metadata"]["labels"])


def grpc_port(docs: tuple[dict, ...], role: str) -> int:
    args = container(docs, role)["args"]
    return int(args[args.index("--port") + 1])


@pytest.fixture(scope="module", params=["cpu", "gpu", "cpu+planner", "gpu+planner"])
def docs(request):
    return render(request.param)


def test_every_pod_is_covered_by_a_default_deny(docs):
    deny = by_kind(docs, "NetworkPolicy")["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")


def test_clients_reach_the_gateway_api_only(docs):
    api = int(container(docs, "gateway")["args"][container(docs, "gateway")["args"].index("--port") + 1])
    assert api == 8000
    assert allowed(docs, EXTERNAL, "gateway", api)
    assert not allowed(docs, EXTERNAL, "gateway", 8001), "the internal port is for probes and Prometheus"
    for role in ("prefill", "decode", "redis", "otel-collector"):
        for port in (grpc_port(docs, role) if role in ("prefill", "decode") else 6379, 4317):
            assert not allowed(docs, EXTERNAL, role, port), f"outside -> {role}:{port}"


def test_the_gateway_reaches_both_pools(docs):
    gw = pod(docs, "gateway")
    assert grpc_port(docs, "prefill") == 50051 and grpc_port(docs, "decode") == 50061
    assert allowed(docs, gw, "prefill", 50051)
    assert allowed(docs, gw, "decode", 50061)
    assert not allowed(docs, gw, "prefill", 51051), "metrics are for monitoring"
    assert not allowed(docs, STRANGER, "prefill", 50051)
    assert not allowed(docs, STRANGER, "decode", 50061)


def test_decode_pulls_kv_from_prefill(docs):
    assert allowed(docs, pod(docs, "decode"), "prefill", 50051)
    assert not allowed(docs, pod(docs, "redis"), "prefill", 50051)


def test_monitoring_reaches_the_metrics_ports(docs):
    for role in ("prefill", "decode"):
        assert allowed(docs, MONITORING, role, grpc_port(docs, role) + 1000)
        assert allowed(docs, Source("monitoring", {"any": "pod"}), role, grpc_port(docs, role) + 1000)
        assert not allowed(docs, MONITORING, role, grpc_port(docs, role)), "no scrape job needs the gRPC port"
        assert not allowed(docs, Source("default", {}), role, grpc_port(docs, role) + 1000)
    assert allowed(docs, MONITORING, "gateway", 8001)
    assert allowed(docs, Source(NAMESPACE, {"app.kubernetes.io/name": "prometheus"}), "gateway", 8001)


def test_the_internal_port_is_for_monitoring_and_the_planner_only(docs):
    planner = Source(NAMESPACE, {"app.kubernetes.io/name": "planner"})
    assert allowed(docs, planner, "gateway", 8001) == ("planner" in pod_templates(docs)), (
        "the planner component opens 8001 to the planner, and only it does"
    )
    for role in ("prefill", "decode", "redis", "otel-collector"):
        assert not allowed(docs, pod(docs, role), "gateway", 8001), f"{role} -> gateway:8001"
    assert not allowed(docs, STRANGER, "gateway", 8001)


def test_kvrelay_pods_reach_redis_and_nothing_else_does(docs):
    for role in ("gateway", "prefill", "decode"):
        assert allowed(docs, pod(docs, role), "redis", 6379), role
    for other in ("jaeger", "otel-collector", "planner"):
        if other in pod_templates(docs):
            assert not allowed(docs, pod(docs, other), "redis", 6379), other
    assert not allowed(docs, MONITORING, "redis", 6379)


def test_every_pod_reaches_the_collector(docs):
    for name in pod_templates(docs):
        for port in (4317, 4318):
            assert allowed(docs, pod(docs, name), "otel-collector", port), f"{name} -> otel-collector:{port}"
    assert allowed(docs, pod(docs, "otel-collector"), "jaeger", 4317)
    assert not allowed(docs, pod(docs, "gateway"), "jaeger", 4317)


def test_prefill_reaches_decode_only_where_nixl_needs_it():
    """UCX opens connections both ways on ports of its own: only the gpu overlay allows them."""
    cpu, gpu = render("cpu"), render("gpu")
    assert not allowed(cpu, pod(cpu, "prefill"), "decode", 50061)
    assert not allowed(cpu, pod(cpu, "decode"), "prefill", 40000)
    assert allowed(gpu, pod(gpu, "prefill"), "decode", 40000)
    assert allowed(gpu, pod(gpu, "decode"), "prefill", 40000)
    assert not allowed(gpu, pod(gpu, "gateway"), "prefill", 40000)


def test_ray_pods_reach_redis_and_are_reached_by_the_gateways():
    """Ray members listen on free ports their node picks: the gateways and monitoring reach any port."""
    docs = (*render("cpu"), *render("ray"))
    head = pod(docs, "kvrelay-head")
    assert allowed(docs, head, "redis", 6379)
    assert allowed(docs, head, "kvrelay-cpu", 6379), "Ray nodes reach each other on any port"
    assert allowed(docs, pod(docs, "gateway"), "kvrelay-cpu", 41234)
    assert allowed(docs, MONITORING, "kvrelay-cpu", 42234)
    assert allowed(docs, EXTERNAL, "kvrelay-head", 8000), "clients reach a gateway member"
    assert not allowed(docs, EXTERNAL, "kvrelay-head", 6379)
    assert not allowed(docs, STRANGER, "kvrelay-cpu", 41234)
    assert allowed(docs, head, "otel-collector", 4317)
    assert allowed(docs, head, "prefill", 50051) and allowed(docs, head, "decode", 50061), "one registry, one pool"
    assert not allowed(docs, head, "prefill", 51051)


def test_the_evaluator_is_not_trivially_permissive():
    docs = render("cpu")
    open_doc = tuple(d for d in docs if d["kind"] != "NetworkPolicy")
    assert allowed(open_doc, STRANGER, "redis", 6379), "no policy: everything is allowed"
    assert not allowed(docs, STRANGER, "redis", 6379)
    assert selects({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]}]}, {"a": "y"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}, {})
    assert port_matches({"port": 50051, "endPort": 50199}, 50100, {})
    assert not port_matches({"port": 50051, "endPort": 50199}, 50200, {})
    assert port_matches({"port": "grpc"}, 50051, {"grpc": 50051})
