"""What each pool's pods need to start, serve, be probed and stop cleanly, checked on the rendered
overlays: probes on the right ports, grace periods longer than the drains, the settings that reach
the processes (health port, bind address, advertised IP, secrets, tracing resource), image tags,
and what the gpu overlay changes."""

from __future__ import annotations

import pytest

from common.settings import GatewaySettings, WorkerSettings
from tests.unit.test_k8s_render import by_kind, container, env_of, pod_templates, render, render_names, renders

WORKERS = ("prefill", "decode")
HEALTH_PORT = 8081
OVERLAY_RENDERS = [n for n in render_names() if n != "ray"]  # names only: kubectl runs in the tests


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def port_number(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)


def mounted_file(pod: dict, c: dict, path: str) -> tuple[dict, str]:
    """The volume a file path lies on, and the path inside it."""
    for m in c.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            volume = next(v for v in pod["volumes"] if v["name"] == m["name"])
            return volume, path[len(m["mountPath"].rstrip("/")) + 1 :]
    raise AssertionError(f"{path} is on no mounted volume of {c['name']}")


@pytest.mark.parametrize("name", OVERLAY_RENDERS)
def test_workers_are_probed_on_the_health_port(name):
    for role in WORKERS:
        c = container(render(name), role)
        assert env_of(c)["KVRELAY_HEALTH_PORT"]["value"] == str(HEALTH_PORT)
        assert HEALTH_PORT in {p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == HEALTH_PORT, f"{name}/{role}: {probe} is not a grpc probe on 8081"
        startup = c["startupProbe"]
        # The model load: at least 5 minutes before the kubelet gives up on a starting worker.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{name}/{role}"


@pytest.mark.parametrize("name", OVERLAY_RENDERS)
def test_workers_outlive_their_drain(name):
    worker = WorkerSettings()
    for role in WORKERS:
        pod = pod_templates(render(name))[role]["spec"]
        assert pod["terminationGracePeriodSeconds"] > worker.drain_notice_s + worker.drain_timeout_s


@pytest.mark.parametrize("name", OVERLAY_RENDERS)
def test_workers_bind_everywhere_and_advertise_their_pod(name):
    for role in WORKERS:
        c = container(render(name), role)
        env = env_of(c)
        assert c["args"][0] == role
        assert arg_after(c["args"], "--host") == "0.0.0.0"
        port = int(arg_after(c["args"], "--port"))
        ports = {p["containerPort"] for p in c["ports"]}
        assert {port, port + 1000} <= ports, "the gRPC port and the metrics port (port + 1000)"
        assert env["KVRELAY_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["KVRELAY_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("name", OVERLAY_RENDERS)
def test_every_kvrelay_pod_gets_its_secrets_and_tracing_resource(name):
    docs = render(name)
    pods = pod_templates(docs)
    for role in ("gateway", *WORKERS):
        pod = pods[role]["spec"]
        c = pod["containers"][0]
        env = env_of(c)
        names = [e["name"] for e in c["env"]]
        assert env["KVRELAY_REGISTRY"]["valueFrom"]["secretKeyRef"] == {"name": "kvrelay-redis", "key": "url"}
        volume, key = mounted_file(pod, c, env["KVRELAY_SHARED_SECRET_FILE"]["value"])
        assert volume["secret"]["secretName"] == "kvrelay-shared-secret" and key == "secret"
        for var, want in (("CA_FILE", "ca.crt"), ("CERT_FILE", "tls.crt"), ("KEY_FILE", "tls.key")):
            volume, key = mounted_file(pod, c, env[f"KVRELAY_TLS__{var}"]["value"])
            assert volume["secret"]["secretName"] == "kvrelay-tls" and key == want
        assert env["KVRELAY_TLS__SERVER_NAME"]["value"], "workers are dialled by pod IP"
        assert env["KVRELAY_TRACING__OTLP_ENDPOINT"]["value"] == "http://otel-collector:4317"
        attrs = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert "k8s.pod.name=$(POD_NAME)" in attrs and "k8s.namespace.name=$(POD_NAMESPACE)" in attrs
        # $(VAR) expands only from variables defined earlier in the list.
        for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
            assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == field
            assert names.index(var) < names.index("OTEL_RESOURCE_ATTRIBUTES")


def test_redis_requires_the_password_from_the_secret():
    c = container(render("cpu"), "redis")
    assert c["args"][c["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kvrelay-redis", "key": "password"}


@pytest.mark.parametrize("name", OVERLAY_RENDERS)
def test_the_gateway_is_probed_on_its_internal_port_and_drains(name):
    docs = render(name)
    c = container(docs, "gateway")
    env = env_of(c)
    internal = int(env["KVRELAY_INTERNAL_PORT"]["value"])
    assert env["KVRELAY_INTERNAL_HOST"]["value"] == "0.0.0.0", "probes and Prometheus come from outside the pod"
    public = int(arg_after(c["args"], "--port"))
    assert internal != public
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert c[probe]["httpGet"]["path"] == path
        assert port_number(c, c[probe]["httpGet"]["port"]) == internal, f"{probe} must use the internal port"
    service = by_kind(docs, "Service")["gateway"]
    assert [port_number(c, p["targetPort"]) for p in service["spec"]["ports"]] == [public], "only the API"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    gw = GatewaySettings()
    grace = pod_templates(docs)["gateway"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + gw.drain_notice_s + gw.shutdown_timeout_s


def test_every_pool_has_a_disruption_budget():
    for name, docs in renders().items():
        pdbs = by_kind(docs, "PodDisruptionBudget")
        pods = pod_templates(docs)
        for role in ("gateway", *WORKERS):
            selector = pdbs[role]["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pods[role]["metadata"]["labels"].items(), f"{name}: PDB {role}"
            assert [p for p in pods.values() if selector.items() <= p["metadata"]["labels"].items()] == [pods[role]]


def test_images_are_pinned():
    for name, docs in renders(include_ray=True).items():
        for pod_name, template in pod_templates(docs).items():
            for c in template["spec"]["containers"]:
                image = c["image"]
                tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else None
                assert tag and tag != "latest", f"{name}/{pod_name}: {image} is not pinned"


def test_each_overlay_runs_its_own_images():
    cpu, gpu = render("cpu+planner"), render("gpu+planner")
    for role in WORKERS:
        assert container(cpu, role)["image"] == "kvrelay:0.1.0"
        assert container(gpu, role)["image"] == "kvrelay:0.1.0-cuda"
    for docs in (cpu, gpu):
        for role in ("gateway", "planner"):
            assert container(docs, role)["image"] == "kvrelay-gateway:0.1.0", f"{role}: the image without torch"


PLANNER_RENDERS = [n for n in OVERLAY_RENDERS if "planner" in n]


@pytest.mark.parametrize("name", PLANNER_RENDERS)
def test_one_planner_owns_the_pool_sizes(name):
    docs = render(name)
    deployments = by_kind(docs, "Deployment")
    planner = deployments["planner"]["spec"]
    assert planner["replicas"] == 1 and planner["strategy"]["type"] == "Recreate", "never two planners at once"
    for role in WORKERS:
        assert "replicas" not in deployments[role]["spec"], f"{name}: an apply would undo the planner's {role} size"
    assert deployments["gateway"]["spec"]["replicas"] >= 2, "the planner sizes the pools, not the gateways"
    c = container(docs, "planner")
    assert c["args"][0] == "plan" and arg_after(c["args"], "--adapter") == "kubernetes"
    # It serves nothing: no port to probe, and a failing tick is logged and retried, never fatal.
    assert not c.get("ports") and not {"startupProbe", "readinessProbe", "livenessProbe"} & set(c)
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    pod = pod_templates(docs)["planner"]["spec"]
    secrets = [v for v in pod["volumes"] if "secret" in v] + [
        e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert not secrets, "it needs no registry, shared secret or mTLS key: only its API token"


def test_the_pools_keep_their_count_without_an_autoscaler():
    deployments = by_kind(render("cpu"), "Deployment")
    assert all(deployments[role]["spec"]["replicas"] >= 1 for role in WORKERS)
    assert "planner" not in deployments


def test_the_gpu_overlay_uses_nixl_gpus_and_shared_memory():
    docs = render("gpu")
    for role in WORKERS:
        c = container(docs, role)
        assert arg_after(c["args"], "--transfer") == "nixl", f"{role} must run with --transfer nixl"
        assert c["args"].count("--transfer") == 1
        for kind in ("requests", "limits"):
            assert int(c["resources"][kind]["nvidia.com/gpu"]) == 1, f"{role} {kind}"
        assert env_of(c)["KVRELAY_ENGINE__DEVICE"]["value"] == "cuda"
        pod = pod_templates(docs)[role]["spec"]
        shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory"


def test_the_cpu_overlay_moves_kv_over_grpc_without_gpus():
    docs = render("cpu")
    for role in WORKERS:
        c = container(docs, role)
        assert "nixl" not in c["args"]
        assert "nvidia.com/gpu" not in str(c["resources"])
