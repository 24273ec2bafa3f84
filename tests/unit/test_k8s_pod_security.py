"""Pod Security "restricted" (the namespace enforces it), checked here on every pod template every
rendering makes, KubeRay's included, so a violation fails in the tests rather than at apply time.
Plus what restricted leaves optional and this deployment requires: a read-only root filesystem, with
a writable emptyDir wherever the processes write."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.test_k8s_render import by_kind, pod_templates, render, renders

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
KVRELAY_IMAGES = ("kvrelay:", "kvrelay-gateway:")
HOME = "/home/kvrelay"  # compose/Dockerfile's HOME; test_compose_images checks it is


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What keeps this pod spec out of Pod Security "restricted" (empty: nothing)."""
    bad = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            bad.append(flag)
    psc = pod.get("securityContext", {})
    for v in pod.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind not in ALLOWED_VOLUMES:
            bad.append(f"volume {v['name']}: {kind}")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {s['name']}")
    if psc.get("seLinuxOptions", {}).get("user") or psc.get("seLinuxOptions", {}).get("role"):
        bad.append("pod seLinuxOptions user/role")
    containers = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]
    for c in containers:
        where = f"container {c['name']}"
        sc = c.get("securityContext", {})
        merged = {**psc, **sc}  # container values override the pod's
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        if merged.get("runAsNonRoot") is not True:
            bad.append(f"{where}: runAsNonRoot must be true")
        uid = merged.get("runAsUser")
        if uid is not None and (not isinstance(uid, int) or uid == 0):
            bad.append(f"{where}: runAsUser {uid!r}")
        seccomp = merged.get("seccompProfile", {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp!r}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{where}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{where}: procMount")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            bad.append(f"{where}: AppArmor unconfined")
        if sc.get("seLinuxOptions", {}).get("user") or sc.get("seLinuxOptions", {}).get("role"):
            bad.append(f"{where}: seLinuxOptions user/role")
        if sc.get("seLinuxOptions", {}).get("type") not in (
            None,
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
        ):
            bad.append(f"{where}: seLinuxOptions type")
    return bad


def all_pods() -> dict[str, dict[str, Any]]:
    pods = {}
    for name, docs in renders(include_ray=True).items():
        for pod_name, template in pod_templates(docs).items():
            pods[f"{name}/{pod_name}"] = template["spec"]
    return pods


def test_the_namespace_enforces_restricted():
    for name, docs in renders().items():
        labels = by_kind(docs, "Namespace")["kvrelay"]["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", name


def test_every_pod_meets_restricted():
    pods = all_pods()
    assert any(k.startswith("ray/") for k in pods) and any("/redis" in k for k in pods)
    assert any("/otel-collector" in k for k in pods)
    failures = {name: v for name, pod in pods.items() if (v := restricted_violations(pod))}
    assert not failures, failures


@pytest.mark.parametrize(
    "breakage, finding",
    [
        (lambda p: p.update(hostNetwork=True), "hostNetwork"),
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda p: p["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
        (lambda p: p["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccompProfile"),
        (lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}), "drop ALL"),
        (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "adds"),
        (lambda p: p["containers"][0]["ports"].append({"containerPort": 80, "hostPort": 80}), "hostPort"),
    ],
)
def test_the_checker_catches_each_violation(breakage, finding):
    pod = copy.deepcopy(pod_templates(render("cpu"))["decode"]["spec"])
    assert restricted_violations(pod) == []
    breakage(pod)
    assert any(finding in v for v in restricted_violations(pod)), restricted_violations(pod)


def test_every_container_has_a_read_only_root_filesystem():
    for name, pod in all_pods().items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, f"{name}: {c['name']}"


def test_kvrelay_containers_can_write_where_they_write():
    """/tmp and $HOME/.cache (model and compiler caches): each an emptyDir mount."""
    checked = 0
    for name, pod in all_pods().items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            if not c["image"].startswith(KVRELAY_IMAGES):
                continue
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            for path in ("/tmp", f"{HOME}/.cache"):
                assert path in mounts and "emptyDir" in mounts[path], f"{name}: {c['name']} cannot write {path}"
            checked += 1
    assert checked >= 3 * len(renders()), "every rendering has a gateway, a prefill and a decode container"


# The pods that may hold a service-account token, and the account each must run as: the planner
# scales the pools through the API server (components/planner; its Role is checked in test_k8s_planner).
TOKEN_HOLDERS = {"planner": "kvrelay-planner"}


def test_no_pod_gets_a_service_account_token_or_service_env():
    holders = 0
    for name, pod in all_pods().items():
        account = TOKEN_HOLDERS.get(name.rsplit("/", 1)[1])
        if account is None:
            assert pod.get("automountServiceAccountToken") is False, name
            assert "serviceAccountName" not in pod, f"{name}: only the planner runs as an account of its own"
        else:
            assert pod.get("automountServiceAccountToken") is True, f"{name}: it authenticates with the token"
            assert pod.get("serviceAccountName") == account, f"{name}: the default account holds no Role"
            holders += 1
        # A Service named kvrelay-... would become KVRELAY_..._SERVICE_HOST: a settings variable.
        assert pod.get("enableServiceLinks") is False, name
    assert holders, "no rendering has the planner: the exception above is never exercised"


def test_service_accounts_mount_no_token_unless_the_pod_asks():
    accounts = 0
    for name, docs in renders().items():
        for account, sa in by_kind(docs, "ServiceAccount").items():
            assert sa.get("automountServiceAccountToken") is False, f"{name}: {account}"
            accounts += 1
    assert accounts
