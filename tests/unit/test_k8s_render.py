"""Every way k8s/ is meant to be applied renders with `kubectl kustomize`, and every object it
renders is valid: built-in kinds against the Kubernetes API schemas of one pinned version (strict:
an unknown field fails), custom resources (Prometheus Operator, KEDA, KubeRay) by checks of our own,
their embedded pod templates against the core schema.

The other test_k8s_* modules import `renders()` and the helpers from here."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32"  # the oldest version these manifests promise to apply to
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("prometheus-operator", "keda", "gateway-https", "planner")
# Components that must not be combined: keda and the planner would both own the pools' replica
# counts (the rendering refuses it; test_k8s_planner checks that it does).
EXCLUSIVE = (frozenset({"keda", "planner"}),)
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("ray.io/v1", "RayCluster"),
}

Doc = dict[str, Any]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations); `make setup` installs it")
    return path


def _run_kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)


def _kustomize(directory: Path) -> list[Doc]:
    out = _run_kustomize(directory)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_names() -> list[str]:
    """cpu, gpu, each with every subset of the optional components that may be combined, and the
    Ray manifest."""
    names = []
    for overlay in OVERLAYS:
        for n in range(len(COMPONENTS) + 1):
            for combo in itertools.combinations(COMPONENTS, n):
                if not any(pair <= set(combo) for pair in EXCLUSIVE):
                    names.append("+".join((overlay, *combo)))
    return [*names, "ray"]


def kustomize_with_components(overlay: str, components: list[str]) -> subprocess.CompletedProcess[str]:
    """`kubectl kustomize` of an overlay of the kind k8s/README.md tells operators to write (the
    overlay plus components, in this order), made in a scratch directory."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731 - kustomize refuses absolute paths
        kust = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(K8S / "overlays" / overlay)],
            "components": [rel(K8S / "components" / c) for c in components],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kust))
        return _run_kustomize(Path(tmp))


@functools.cache
def render(name: str) -> tuple[Doc, ...]:
    if name == "ray":
        return tuple(_kustomize(K8S / "ray"))
    overlay, *components = name.split("+")
    if not components:
        return tuple(_kustomize(K8S / "overlays" / overlay))
    out = kustomize_with_components(overlay, components)
    assert out.returncode == 0, f"kubectl kustomize of {name} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def renders(include_ray: bool = False) -> dict[str, tuple[Doc, ...]]:
    names = [n for n in render_names() if include_ray or n != "ray"]
    with ThreadPoolExecutor(8) as pool:  # kubectl runs ~0.3 s a rendering; render() caches each
        return dict(zip(names, pool.map(render, names), strict=True))


def by_kind(docs: tuple[Doc, ...] | list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_templates(docs: tuple[Doc, ...] | list[Doc]) -> dict[str, Doc]:
    """Every pod template a rendering makes, by a readable name: Deployments' and RayCluster groups'."""
    pods = {}
    for d in docs:
        if d["kind"] == "Deployment":
            pods[d["metadata"]["name"]] = d["spec"]["template"]
        elif d["kind"] == "RayCluster":
            pods[f"{d['metadata']['name']}-head"] = d["spec"]["headGroupSpec"]["template"]
            for g in d["spec"]["workerGroupSpecs"]:
                pods[f"{d['metadata']['name']}-{g['groupName']}"] = g["template"]
    return pods


def container(docs: tuple[Doc, ...], deployment: str) -> Doc:
    return by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]["containers"][0]


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


@functools.cache
def _cache_schemas() -> None:
    """kubernetes_validate re-reads its multi-megabyte schema files on every call; read each once."""
    import kubernetes_validate.utils as kv

    kv.schema_contents = functools.cache(kv.schema_contents)


def validate_builtin(doc: Doc) -> None:
    import kubernetes_validate

    _cache_schemas()
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", render_names())
def test_renders(name):
    docs = renders(include_ray=True)[name]
    kinds = {d["kind"] for d in docs}
    if name == "ray":
        assert "RayCluster" in kinds
        return
    assert {"Namespace", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    assert all(d["metadata"].get("namespace") == "kvrelay" for d in docs if d["kind"] != "Namespace")
    if "prometheus-operator" in name:
        assert {"PodMonitor", "PrometheusRule"} <= kinds
    if "keda" in name:
        assert "ScaledObject" in kinds
    if "planner" in name:
        assert {"ServiceAccount", "Role", "RoleBinding"} <= kinds and "planner" in by_kind(docs, "Deployment")
        assert "ScaledObject" not in kinds, "the planner sizes the pools: KEDA must not"
    if "keda" in name or "planner" in name:
        pools = by_kind(docs, "Deployment")
        assert not {"replicas"} & (set(pools["prefill"]["spec"]) | set(pools["decode"]["spec"])), (
            "the autoscaler owns the pools' counts: an apply must not reset them"
        )


def test_every_builtin_object_validates_strictly():
    seen: set[str] = set()
    checked = 0
    for name, docs in renders(include_ray=True).items():
        for d in docs:
            if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS:
                continue
            key = json.dumps(d, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                validate_builtin(d)
            except Exception as e:  # name the object: the schema error alone says only the field
                pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {e}")
            checked += 1
    assert checked > 20


def test_the_validator_rejects_unknown_fields_and_bad_types():
    import kubernetes_validate

    pdb = next(iter(by_kind(render("cpu"), "PodDisruptionBudget").values()))
    validate_builtin(pdb)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin({**pdb, "spec": {**pdb["spec"], "maxUnavailabel": 1}})
    dep = by_kind(render("cpu"), "Deployment")["decode"]
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50061"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(bad)


def test_only_known_custom_resources_are_rendered():
    for name, docs in renders(include_ray=True).items():
        for d in docs:
            builtin_group = (
                "/" not in d["apiVersion"]
                or d["apiVersion"].split("/")[0].endswith(".k8s.io")
                or (d["apiVersion"].split("/")[0] in ("apps", "policy", "batch", "autoscaling"))
            )
            assert builtin_group or (d["apiVersion"], d["kind"]) in CUSTOM_KINDS, f"{name}: {d['kind']}"


def test_raycluster_pod_templates_are_valid_pods():
    ray = by_kind(render("ray"), "RayCluster")["kvrelay"]
    spec = ray["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert spec["workerGroupSpecs"], "no worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for pod_name, template in pod_templates([ray]).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": pod_name}, "template": template}
        validate_builtin(wrapped)
        c = template["spec"]["containers"][0]
        assert c["image"] == "kvrelay:0.1.0", "the Ray groups run the kvrelay CPU image"
        # KubeRay injects wget-based probes unless the template has its own; the image has no wget.
        assert "readinessProbe" in c and "livenessProbe" in c
        assert "wget" not in json.dumps(c)
        env = env_of(c)
        assert env["KVRELAY_REGISTRY"]["valueFrom"]["secretKeyRef"] == {"name": "kvrelay-redis", "key": "url"}
        # `kvrelay ray up` hands its shell's KVRELAY_* variables to members on every pod: none may be
        # pod-specific (each member advertises its node's IP and picks its own ports).
        assert not {"KVRELAY_ADVERTISE_HOST", "KVRELAY_HEALTH_PORT", "KVRELAY_INTERNAL_PORT"} & set(env)
        assert template["spec"]["enableServiceLinks"] is False, "KubeRay's kvrelay-head-svc would inject KVRELAY_*"


def test_raycluster_ray_version_is_the_images():
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert m, "compose/Dockerfile pins no RAY_VERSION"
    assert by_kind(render("ray"), "RayCluster")["kvrelay"]["spec"]["rayVersion"] == m.group(1)
    assert "ray[default]==${RAY_VERSION}" in dockerfile, "KubeRay needs the dashboard agent: ray[default]"


def test_scaled_objects_are_well_formed():
    docs = render("cpu+keda")
    deployments = by_kind(docs, "Deployment")
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"prefill", "decode"}
    for name, so in scaled.items():
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == name and name in deployments
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        assert "replicas" not in deployments[name]["spec"], "the HPA owns the count; an apply must not reset it"
        for t in spec["triggers"]:
            assert t["type"] == "prometheus"
            assert t["metricType"] in ("AverageValue", "Value")
            meta = t["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
            assert meta["serverAddress"].startswith("http") and meta["query"].strip()
            assert float(meta["threshold"]) > 0


def test_pod_monitors_select_pods_and_name_their_ports():
    docs = render("cpu+prometheus-operator")
    pods = pod_templates(docs)
    for name, pm in by_kind(docs, "PodMonitor").items():
        want = pm["spec"]["selector"]["matchLabels"]
        matched = [p for p in pods.values() if want.items() <= p["metadata"]["labels"].items()]
        assert matched, f"PodMonitor {name} selects no pod"
        for ep in pm["spec"]["podMetricsEndpoints"]:
            for p in matched:
                names = {port["name"] for c in p["spec"]["containers"] for port in c.get("ports", [])}
                assert ep["port"] in names, f"PodMonitor {name}: port {ep['port']} is not a named port"
