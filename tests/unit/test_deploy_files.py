"""compose/ and k8s/ speak the kvrelay CLI: every command line a container runs is one the CLI
accepts, and every KVRELAY_* variable it is given is a real setting that validates. Checked on the
rendered Kubernetes manifests and on the compose file (the other test_k8s_* and test_compose_*
modules check probes, security, policies and the rest)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer.main
import yaml

from common.settings import GatewaySettings, WorkerSettings, load_settings, unknown_env_vars
from kvrelay.cli import app
from tests.unit.test_k8s_render import by_kind, container, pod_templates, render

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
CLI = typer.main.get_command(app)
ROLES = ("prefill", "decode", "gateway")
# What the kubelet fills in from the downward API or a Secret, as plausible stand-ins.
FROM_FIELD = {"status.podIP": "10.0.0.1", "metadata.name": "decode-7d9f-abcde", "metadata.namespace": "kvrelay"}
FROM_SECRET = {("kvrelay-redis", "url"): "redis://:pw@redis:6379/0"}


def check_command(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The arguments parse as a kvrelay command, and its settings validate with this environment."""
    role = args[0]
    command = CLI.commands[role]  # type: ignore[attr-defined]
    ctx = command.make_context(f"kvrelay {role}", list(args[1:]), resilient_parsing=False)
    assert not ctx.args, f"unexpected arguments {ctx.args}"
    for k in list(os.environ):
        if k.startswith("KVRELAY_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        assert k.startswith("KVRELAY_"), k
        monkeypatch.setenv(k, v)
    cls = GatewaySettings if role == "gateway" else WorkerSettings
    assert not unknown_env_vars(cls, env), f"{role}: variables that name no setting"
    flags = {
        k: v
        for k, v in ctx.params.items()
        if k not in ("config", "log_level", "log_format") and v not in (None, [], ())
    }
    if role == "gateway":
        s = load_settings(GatewaySettings, **flags)
    else:
        engine = {k: flags.pop(k) for k in ("model", "threads", "kv_cache_mb", "block_size") if k in flags}
        s = load_settings(WorkerSettings, role=role, engine=engine, **flags)
    assert s.registry, f"{role} must use the registry so the pools scale independently"


def k8s_env(c: dict) -> dict[str, str]:
    env = {}
    for e in c.get("env", []):
        if not e["name"].startswith("KVRELAY_"):
            continue
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = FROM_FIELD[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = FROM_SECRET[(ref["name"], ref["key"])]
    return env


@pytest.mark.parametrize("name", ["cpu", "gpu", "cpu+gateway-https", "gpu+prometheus-operator+keda+gateway-https"])
def test_k8s_containers_run_valid_commands(name, monkeypatch):
    docs = render(name)
    for role in ROLES:
        c = container(docs, role)
        assert c["args"][0] == role
        check_command(c["args"], k8s_env(c), monkeypatch)


def test_k8s_selectors_match_their_pods():
    docs = render("cpu")
    pods = pod_templates(docs)
    for name, d in by_kind(docs, "Deployment").items():
        assert d["spec"]["selector"]["matchLabels"].items() <= pods[name]["metadata"]["labels"].items(), name
    for name, svc in by_kind(docs, "Service").items():
        matched = [p for p in pods.values() if svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert matched, f"Service {name} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            names = {p.get("name") for c in matched[0]["spec"]["containers"] for p in c.get("ports", [])}
            assert isinstance(target, int) or target in names, f"Service {name}: no port named {target}"


def test_k8s_patches_set_real_settings():
    for kust in (ROOT / "k8s").rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kust.read_text()).get("patches", []):
            ops = yaml.safe_load((kust.parent / patch["path"]).read_text())
            cls = GatewaySettings if patch["target"]["name"] == "gateway" else WorkerSettings
            for op in ops:
                value = op.get("value")
                if isinstance(value, dict) and str(value.get("name", "")).startswith("KVRELAY_"):
                    assert not unknown_env_vars(cls, {value["name"]: value["value"]}), f"{kust}: {value['name']}"


def test_compose_services_run_valid_commands(monkeypatch):
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    for role in ROLES:
        svc = services[role]
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        entrypoint = " ".join(svc["entrypoint"])
        assert "export KVRELAY_REGISTRY=" in entrypoint, "the entrypoint sets the registry (test_compose_config)"
        env = {k: str(v) for k, v in svc["environment"].items()}
        check_command(svc["command"], {**env, "KVRELAY_REGISTRY": "redis://:pw@redis:6379/0"}, monkeypatch)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert (COMPOSE.parent / src).exists(), f"{src} is mounted but does not exist"


def test_a_bad_command_line_is_caught(monkeypatch):
    with pytest.raises(Exception, match="No such option"):
        check_command(["decode", "--no-such-flag"], {}, monkeypatch)
    with pytest.raises(AssertionError, match="name no setting"):
        check_command(["decode", "--registry", "redis://r:6379"], {"KVRELAY_ENGINE__THREADZ": "4"}, monkeypatch)
