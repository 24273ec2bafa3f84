"""components/planner runs `kvrelay plan` in the cluster with exactly the access it uses: its Role
grants the API calls the Kubernetes adapter makes (taken from the adapter itself, not restated),
its command line parses with the real CLI, its gateway URL names a headless Service that the
scraper expands to every gateway pod, the NetworkPolicies let it reach the gateways' internal
port, and it is never rendered together with KEDA."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.planner.kubernetes import KubernetesAdapter
from gateway.planner.scrape import metrics_url, per_address
from tests.unit.test_deploy_files import CLI
from tests.unit.test_k8s_network_policy import EXTERNAL, MONITORING, NAMESPACE, STRANGER, Source, allowed, pod
from tests.unit.test_k8s_render import (
    EXCLUSIVE,
    by_kind,
    container,
    kustomize_with_components,
    pod_templates,
    render,
    render_names,
)
from tests.unit.test_planner_scrape import StubDNS, self_signed_cert

ROOT = Path(__file__).resolve().parents[2]
VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}
API_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/[^/]+/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?$"
)

Grant = tuple[str, str, str, str]  # api group, resource[/subresource], object name, verb


@pytest.fixture(scope="module", params=["cpu+planner", "gpu+planner"])
def docs(request):
    return render(request.param)


def plan_params(docs) -> dict:
    """The planner container's command line, parsed by the `kvrelay plan` the image runs."""
    args = container(docs, "planner")["args"]
    assert args[0] == "plan"
    ctx = CLI.commands["plan"].make_context("kvrelay plan", list(args[1:]), resilient_parsing=False)  # type: ignore[attr-defined]
    assert not ctx.args, f"unexpected arguments {ctx.args}"
    return ctx.params


def adapter_calls(params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[Grant]:
    """Every API call the adapter makes for one look and one change of both pools, built as the
    pod builds it (in-cluster: service-account token and CA), as RBAC (group, resource, name, verb)."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token")
    ca, _ = self_signed_cert(tmp_path)
    (account / "ca.crt").write_bytes(ca.read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": {"replicas": 1}})

    deployments = {"prefill": params["prefill_deployment"], "decode": params["decode_deployment"]}
    adapter = KubernetesAdapter.in_cluster(
        params["namespace"], deployments, account_dir=account, transport=httpx.MockTransport(answer)
    )
    adapter.apply({role: n + 1 for role, n in adapter.current().items()})
    adapter.close()
    assert {r.method for r in seen} == {"GET", "PATCH"}, "a look and a change"
    calls = set()
    for r in seen:
        m = API_PATH.match(r.url.path)
        assert m, f"not a namespaced API object path: {r.url.path}"
        assert m["ns"] == NAMESPACE, f"the adapter calls namespace {m['ns']}, the Role lives in {NAMESPACE}"
        resource = f"{m['resource']}/{m['sub']}" if m["sub"] else m["resource"]
        calls.add((m["group"], resource, m["name"], VERBS[r.method]))
    return calls


def role_grants(role: dict) -> set[Grant]:
    grants = set()
    for rule in role["rules"]:
        assert "*" not in str(rule), f"a wildcard grants more than the planner uses: {rule}"
        assert rule.get("resourceNames"), "without resourceNames the Role could scale any Deployment"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule["resourceNames"]:
                    grants.update((group, resource, name, verb) for verb in rule["verbs"])
    return grants


def test_the_role_grants_exactly_what_the_adapter_calls(docs, tmp_path, monkeypatch):
    role = by_kind(docs, "Role")["kvrelay-planner"]
    assert role["metadata"]["namespace"] == NAMESPACE
    calls = adapter_calls(plan_params(docs), tmp_path, monkeypatch)
    assert role_grants(role) == calls
    assert {name for _, _, name, _ in calls} <= set(by_kind(docs, "Deployment")), "it scales Deployments that exist"


def test_the_grant_check_would_catch_a_wider_or_narrower_role(docs, tmp_path, monkeypatch):
    role = by_kind(docs, "Role")["kvrelay-planner"]
    calls = adapter_calls(plan_params(docs), tmp_path, monkeypatch)
    (rule,) = role["rules"]
    assert role_grants({"rules": [{**rule, "verbs": ["get"]}]}) != calls
    assert role_grants({"rules": [{**rule, "resources": ["deployments", "deployments/scale"]}]}) != calls
    with pytest.raises(AssertionError, match="wildcard"):
        role_grants({"rules": [{**rule, "verbs": ["*"]}]})


def test_the_planner_runs_as_the_bound_account(docs):
    template = pod_templates(docs)["planner"]["spec"]
    account = template["serviceAccountName"]
    assert account in by_kind(docs, "ServiceAccount")
    assert template["automountServiceAccountToken"] is True, "the adapter reads the mounted token"
    binding = by_kind(docs, "RoleBinding")["kvrelay-planner"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kvrelay-planner"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding"), "namespace-scoped only"


def test_the_command_line_is_the_documented_one_with_defaults(docs):
    params = plan_params(docs)
    defaults = CLI.commands["plan"].make_context("kvrelay plan", ["--gateway", "x"]).params  # type: ignore[attr-defined]
    given = {k for k, v in params.items() if v != defaults[k]}
    assert given == {"adapter", "gateway"}, f"flags set away from their defaults: {given}"
    assert params["adapter"] == "kubernetes" and params["namespace"] == NAMESPACE
    assert params["kube_api"] is None, "in-cluster: the service account's API address, token and CA"
    assert params["once"] is False


def test_the_gateway_url_names_every_gateway_pod(docs):
    (url,) = plan_params(docs)["gateway"]
    parts = urlsplit(metrics_url(url))
    service = by_kind(docs, "Service")["gateway-internal"]
    assert parts.hostname == f"gateway-internal.{NAMESPACE}.svc" and parts.path == "/metrics"
    spec = service["spec"]
    assert spec["clusterIP"] == "None", "headless: the name resolves to each pod, not to one virtual IP"
    assert spec["publishNotReadyAddresses"] is True, "a gateway is unready without decode workers, yet reports"
    selected = [
        n for n, t in pod_templates(docs).items() if spec["selector"].items() <= t["metadata"]["labels"].items()
    ]
    assert selected == ["gateway"]
    gateway = container(docs, "gateway")
    internal = int(next(e["value"] for e in gateway["env"] if e["name"] == "KVRELAY_INTERNAL_PORT"))
    (port,) = spec["ports"]
    target = next(p["containerPort"] for p in gateway["ports"] if p["name"] == port["targetPort"])
    assert parts.port == port["port"] == target == internal, "the URL reaches /metrics on the internal port"
    # Plain http, so the scraper takes one URL per pod (https would keep the name).
    pods = StubDNS({parts.hostname: ["10.1.0.4", "10.1.0.5"]})
    assert per_address(metrics_url(url), pods) == ["http://10.1.0.4:8001/metrics", "http://10.1.0.5:8001/metrics"]


def test_the_planner_reaches_the_gateways_internal_port_and_nothing_else(docs):
    planner = pod(docs, "planner")
    assert allowed(docs, planner, "gateway", 8001)
    assert not allowed(docs, STRANGER, "gateway", 8001), "the planner's label opens it, not the namespace"
    assert not allowed(docs, planner, "prefill", 50051) and not allowed(docs, planner, "decode", 50061)
    assert not allowed(docs, planner, "redis", 6379)
    for src in (EXTERNAL, MONITORING, STRANGER, pod(docs, "gateway")):
        assert not allowed(docs, src, "planner", 8000), "it serves nothing: nothing reaches it"


def test_without_the_component_the_planner_label_opens_nothing():
    docs = render("cpu")
    assert not allowed(docs, Source(NAMESPACE, {"app.kubernetes.io/name": "planner"}), "gateway", 8001)


def test_the_planner_and_keda_are_never_combined():
    assert frozenset({"keda", "planner"}) in EXCLUSIVE
    assert not [n for n in render_names() if "keda" in n and "planner" in n]
    assert not by_kind(render("cpu+planner"), "ScaledObject")
    for components in (["keda", "planner"], ["planner", "keda"]):
        out = kustomize_with_components("cpu", components)
        assert out.returncode != 0, f"cpu with {components} rendered: two owners of the pools' replica counts"
        assert "replicas" in out.stderr, out.stderr
    readme = (ROOT / "k8s" / "README.md").read_text()
    section = readme[readme.index("## The planner") :]
    assert "components/keda" in section and "never both" in section


def test_the_planner_runs_in_the_image_without_torch():
    """The planner runs the gateway image, which has neither torch nor safetensors."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['safetensors'] = None\n"
        "import kvrelay.cli, kvrelay.plan_command, common.logs\n"
        "import gateway.planner.kubernetes, gateway.planner.loop, gateway.planner.policy, gateway.planner.scrape\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"the planner needs a module the gateway image lacks:\n{out.stderr[-800:]}"
