"""compose/ and k8s/ checked statically (no container engine here): every file parses, every
command line is one the kvrelay CLI accepts, every KVRELAY_* variable is a real setting, every
mounted or generated file exists, and selectors match the pods they are meant to select."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer.main
import yaml

from common.settings import GatewaySettings, WorkerSettings, load_settings, unknown_env_vars
from kvrelay.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
K8S = ROOT / "k8s" / "base"
CLI = typer.main.get_command(app)


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
    flags = {k: v for k, v in ctx.params.items() if k not in ("config", "log_level") and v not in (None, [], ())}
    if role == "gateway":
        load_settings(GatewaySettings, **flags)
    else:
        engine = {k: flags.pop(k) for k in ("model", "threads", "kv_cache_mb", "block_size") if k in flags}
        s = load_settings(WorkerSettings, role=role, engine=engine, **flags)
        assert s.registry, f"{role} must register so the pools can scale independently"


def test_compose_file(monkeypatch):
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"redis", "prefill", "decode", "gateway", "prometheus", "grafana", "otel-collector", "jaeger"} <= set(
        services
    )
    for name in ("prefill", "decode", "gateway"):
        svc = services[name]
        assert (ROOT / "compose" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        check_command(svc["command"], {k: str(v) for k, v in svc["environment"].items()}, monkeypatch)
    for svc in services.values():
        for dep in svc.get("depends_on", []):
            assert dep in services
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert (COMPOSE.parent / src).exists(), f"{src} is mounted but does not exist"
    grace = int(services["decode"]["stop_grace_period"].rstrip("s"))
    assert grace > WorkerSettings().drain_timeout_s


def k8s_docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / res).read_text()) if d]
    for gen in kust["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S / f.split("=")[-1]).is_file(), f
    return docs


def test_k8s_manifests(monkeypatch):
    docs = k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for want in ("prefill", "decode", "gateway", "redis"):
        assert ("Deployment", want) in kinds
    pods = {}
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]
        pods[d["metadata"]["name"]] = (labels, spec["template"]["spec"])
    for d in docs:
        if d["kind"] == "Service":
            assert any(d["spec"]["selector"].items() <= lbl.items() for lbl, _ in pods.values()), d["metadata"]["name"]
    for name in ("prefill", "decode", "gateway"):
        _, pod = pods[name]
        c = pod["containers"][0]
        env = {e["name"]: e.get("value", "10.0.0.1") for e in c.get("env", [])}
        check_command(c["args"], env, monkeypatch)
        if name != "gateway":
            assert "KVRELAY_ADVERTISE_HOST" in env, "workers must advertise their pod IP"
            assert pod["terminationGracePeriodSeconds"] > WorkerSettings().drain_timeout_s
    # the collector config the k8s Deployment mounts is the one the test suite validates
    assert (K8S / "observability" / "otel-collector.yaml").is_file()


def test_k8s_overlays_patch_what_exists():
    names = {d["metadata"]["name"] for d in k8s_docs()}
    for overlay in ("cpu", "gpu"):
        kust = yaml.safe_load((K8S.parent / "overlays" / overlay / "kustomization.yaml").read_text())
        assert kust["resources"] == ["../../base"]
        for patch in kust.get("patches", []):
            assert patch["target"]["name"] in names
            ops = yaml.safe_load((K8S.parent / "overlays" / overlay / patch["path"]).read_text())
            assert all(op["op"] in ("add", "replace", "remove") and op["path"].startswith("/spec/") for op in ops)
            for op in ops:
                value = op.get("value")
                if isinstance(value, dict) and str(value.get("name", "")).startswith("KVRELAY_"):
                    assert not unknown_env_vars(WorkerSettings, {value["name"]: value["value"]})


def test_a_bad_command_line_is_caught(monkeypatch):
    with pytest.raises(Exception, match="No such option"):
        check_command(["decode", "--no-such-flag"], {}, monkeypatch)
    with pytest.raises(AssertionError, match="name no setting"):
        check_command(["decode", "--registry", "redis://r:6379"], {"KVRELAY_ENGINE__THREADZ": "4"}, monkeypatch)
