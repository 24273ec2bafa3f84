"""The adapters against fakes: the Kubernetes API (a fake transport that checks each request),
the Ray controller actor (a fake handle), and the dry run."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.planner.adapters import AdapterError, DryRunAdapter
from gateway.planner.kubernetes import MERGE_PATCH, KubernetesAdapter
from gateway.planner.ray_actor import RayAdapter
from tests.unit.test_planner_scrape import self_signed_cert

SCALE = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"


class FakeKubernetes:
    """The scale subresource of some Deployments, as the API server serves it."""

    def __init__(self, replicas: dict[str, int], namespace: str = "kvrelay", token: str = "sa-token") -> None:
        self.replicas = replicas
        self.namespace = namespace
        self.token = token
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"kind": "Status", "message": "Unauthorized"})
        for name in self.replicas:
            if request.url.path == SCALE.format(ns=self.namespace, name=name):
                break
        else:
            return httpx.Response(404, json={"kind": "Status", "message": f"{request.url.path} not found"})
        if request.method == "PATCH":
            assert request.headers["content-type"] == MERGE_PATCH
            body = json.loads(request.content)
            assert set(body) == {"spec"} and set(body["spec"]) == {"replicas"}
            self.replicas[name] = body["spec"]["replicas"]
        elif request.method != "GET":
            return httpx.Response(405)
        spec = {"replicas": self.replicas[name]} if self.replicas[name] else {}  # omitted when 0
        return httpx.Response(200, json={"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": spec})


def k8s(fake: FakeKubernetes, tmp_path, **kw: object) -> KubernetesAdapter:
    token = tmp_path / "token"
    token.write_text(fake.token + "\n")
    return KubernetesAdapter("https://api:6443", token, transport=httpx.MockTransport(fake), **kw)  # type: ignore[arg-type]


def test_kubernetes_reads_and_patches_the_scale_subresource(tmp_path):
    fake = FakeKubernetes({"prefill": 2, "decode": 0})
    adapter = k8s(fake, tmp_path)
    assert adapter.current() == {"prefill": 2, "decode": 0}
    adapter.apply({"decode": 3})
    assert fake.replicas == {"prefill": 2, "decode": 3}
    patch = fake.requests[-1]
    assert patch.method == "PATCH" and patch.url.path == "/apis/apps/v1/namespaces/kvrelay/deployments/decode/scale"
    assert json.loads(patch.content) == {"spec": {"replicas": 3}}


def test_kubernetes_names_and_namespace_are_configurable(tmp_path):
    fake = FakeKubernetes({"llm-prefill": 1, "llm-decode": 1}, namespace="serving")
    adapter = k8s(fake, tmp_path, namespace="serving", deployments={"prefill": "llm-prefill", "decode": "llm-decode"})
    adapter.apply({"prefill": 4, "decode": 2})
    assert fake.replicas == {"llm-prefill": 4, "llm-decode": 2}


def test_kubernetes_errors_say_what_to_fix(tmp_path):
    with pytest.raises(AdapterError, match="404.*check --namespace"):
        k8s(FakeKubernetes({"prefill": 1, "decode": 1}, namespace="other"), tmp_path).current()
    fake = FakeKubernetes({"prefill": 1, "decode": 1})
    adapter = k8s(fake, tmp_path)
    fake.token = "rotated"
    with pytest.raises(AdapterError, match="401.*token was refused"):
        adapter.apply({"prefill": 2})
    (tmp_path / "token").write_text("rotated")  # the file is read again at every call
    adapter.apply({"prefill": 2})
    assert fake.replicas["prefill"] == 2


def test_in_cluster_uses_the_service_account(tmp_path, monkeypatch):
    cert, _ = self_signed_cert(tmp_path)
    cert.rename(tmp_path / "ca.crt")
    (tmp_path / "token").write_text("sa-token")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(AdapterError, match="not running in a Kubernetes pod"):
        KubernetesAdapter.in_cluster(account_dir=tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    fake = FakeKubernetes({"prefill": 1, "decode": 5})
    adapter = KubernetesAdapter.in_cluster(account_dir=tmp_path, transport=httpx.MockTransport(fake))
    assert adapter.current() == {"prefill": 1, "decode": 5}
    assert {str(r.url.copy_with(path="/")) for r in fake.requests} == {"https://10.96.0.1/"}


class FakeController:
    """The controller actor's contract; `.remote()` returns the value itself and get is identity."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self._sizes = sizes
        self.calls: list[tuple[str, int]] = []
        self.sizes = _Method(lambda: dict(self._sizes))
        self.scale = _Method(self._scale)

    def _scale(self, role: str, n: int) -> dict[str, int]:
        self.calls.append((role, n))
        self._sizes[role] = n
        return dict(self._sizes)


class _Method:
    def __init__(self, fn) -> None:  # noqa: ANN001
        self.remote = fn


def test_ray_reads_sizes_and_scales_each_pool():
    controller = FakeController({"prefill": 1, "decode": 2, "gateway": 1})
    resolved = []
    adapter = RayAdapter(controller, get=lambda ref: resolved.append(ref) or ref)
    assert adapter.current() == {"prefill": 1, "decode": 2}
    adapter.apply({"prefill": 3, "decode": 4})
    assert controller.calls == [("decode", 4), ("prefill", 3)]
    assert adapter.current() == {"prefill": 3, "decode": 4}
    assert len(resolved) == 4  # every remote call was waited for


def test_dry_run_prints_and_remembers_but_applies_nothing():
    lines: list[str] = []
    adapter = DryRunAdapter(lines.append)
    assert adapter.current() == {}
    adapter.apply({"prefill": 3})
    assert lines == ["dry run, not applied: prefill=3"]
    assert adapter.current() == {"prefill": 3}
