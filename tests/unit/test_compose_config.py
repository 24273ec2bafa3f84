"""compose/docker-compose.yml, checked without a container engine: docker-compose 1.29 accepts it,
every kvrelay service is health-checked, hardened, limited and started in order, and the pieces
that run inside the containers are run here for real: the health checks against live gRPC and HTTP
servers, the entrypoint that builds the registry URL, Redis with its password, and mutual TLS with
the certificate make-secrets.sh issues."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from common.settings import GatewaySettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
MAKE_SECRETS = ROOT / "compose" / "make-secrets.sh"
KVRELAY = ("prefill", "decode", "gateway")
WORKERS = ("prefill", "decode")


def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def unescape(s: str) -> str:
    """What compose passes to the container for a string of the file: `$$` is a literal `$`."""
    return s.replace("$$", "$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config() -> dict:
    """The file as docker-compose 1.29 resolves it (anchors merged, paths absolute)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (`make setup` installs it); it validates the compose file")
    out = subprocess.run([binary, "-f", str(COMPOSE), "config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; make-secrets.sh needs it")
    d = tmp_path_factory.mktemp("secrets") / "s"
    subprocess.run(["sh", str(MAKE_SECRETS), str(d)], check=True, capture_output=True)
    return d


def test_docker_compose_accepts_the_file(config):
    assert set(KVRELAY) | {"redis", "prometheus", "grafana", "otel-collector", "jaeger"} <= set(config["services"])


def test_the_file_is_plain_compose_specification():
    doc = raw()
    assert "version" not in doc, "the Compose Specification has no version; 1.29 and v2 both read it without"
    assert "name" not in doc, "docker-compose 1.29 rejects a top-level name"


def test_kvrelay_services_wait_for_what_they_need(config):
    services = config["services"]
    for role in WORKERS:
        assert services[role]["depends_on"]["redis"]["condition"] == "service_healthy"
    for dep in ("redis", "prefill", "decode"):
        assert services["gateway"]["depends_on"][dep]["condition"] == "service_healthy"
    for name in (*KVRELAY, "redis"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["interval"] and check["retries"] >= 1


def test_every_service_has_resource_limits(config):
    for name, svc in config["services"].items():
        assert float(svc["cpus"]) > 0, f"{name} has no cpus limit"
        assert svc["mem_limit"], f"{name} has no mem_limit"


def test_kvrelay_containers_are_hardened(config):
    for name in (*KVRELAY, "redis"):
        svc = config["services"][name]
        uid, _, gid = svc["user"].partition(":")
        assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), f"{name}: numeric non-root user"
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in svc["security_opt"]
    for name in KVRELAY:
        assert {"/tmp", "/home/kvrelay/.cache"} <= set(config["services"][name]["tmpfs"])


def test_images_are_pinned(config):
    for name, svc in config["services"].items():
        image = svc["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: {image}"


def test_graceful_stops_outlast_the_drains(config):
    seconds = lambda v: int(v.rstrip("s")) if v.endswith("s") and v[:-1].isdigit() else int(v[:-1]) * 60  # noqa: E731
    worker, gw = WorkerSettings(), GatewaySettings()
    for role in WORKERS:
        assert seconds(config["services"][role]["stop_grace_period"]) > worker.drain_notice_s + worker.drain_timeout_s
    assert seconds(config["services"]["gateway"]["stop_grace_period"]) > gw.drain_notice_s + gw.shutdown_timeout_s


def test_secret_files_are_those_make_secrets_writes(config, secrets_dir):
    files = {Path(s["file"]).name for s in config["secrets"].values()}
    assert files <= {p.name for p in secrets_dir.iterdir()}
    assert all(Path(s["file"]).parent == ROOT / "compose" / "secrets" for s in config["secrets"].values())
    for name in KVRELAY:
        svc = config["services"][name]
        mounted = {f"/run/secrets/{s['source']}" for s in svc["secrets"]}
        paths = {v for k, v in svc["environment"].items() if k.endswith("_FILE")}
        assert paths and paths <= mounted, f"{name} reads {paths - mounted}, which is not mounted"


def test_prometheus_scrapes_the_ports_the_services_serve(config):
    jobs = {
        j["job_name"]: j
        for j in yaml.safe_load((ROOT / "k8s/base/observability/prometheus.yaml").read_text())["scrape_configs"]
    }
    gw = config["services"]["gateway"]
    assert jobs["kvrelay-gateway"]["static_configs"][0]["targets"] == [
        f"gateway:{gw['environment']['KVRELAY_INTERNAL_PORT']}"
    ]
    for role in WORKERS:
        cmd = config["services"][role]["command"]
        port = int(cmd[cmd.index("--port") + 1])
        assert jobs[f"kvrelay-{role}"]["dns_sd_configs"][0] == {"names": [role], "type": "A", "port": port + 1000}


def test_the_worker_healthcheck_asks_grpc_health(config):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    svc = config["services"]["prefill"]
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    port = int(svc["environment"]["KVRELAY_HEALTH_PORT"])
    assert f"127.0.0.1:{port}" in test[3]
    assert config["services"]["decode"]["healthcheck"]["test"] == test
    local = free_port()
    code = unescape(test[3]).replace(f"127.0.0.1:{port}", f"127.0.0.1:{local}")
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{local}")
    server.start()
    try:
        run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True).returncode  # noqa: E731
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run() != 0, "a draining or loading worker is not healthy"
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run() == 0
    finally:
        server.stop(0)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0, "nothing listening"


def test_the_gateway_healthcheck_asks_ready_on_the_internal_port(config):
    svc = config["services"]["gateway"]
    test = svc["healthcheck"]["test"]
    port = int(svc["environment"]["KVRELAY_INTERNAL_PORT"])
    assert f"http://127.0.0.1:{port}/ready" in test[3]
    status = {"code": 503}

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):  # noqa: ANN002
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = unescape(test[3]).replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}")
    try:
        assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0
        status["code"] = 200
        assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    finally:
        server.shutdown()


def test_the_entrypoint_builds_the_registry_url_from_the_secret(config, tmp_path):
    svc = config["services"]["decode"]
    entrypoint = [unescape(part).replace("/run/secrets/", f"{tmp_path}/") for part in svc["entrypoint"]]
    (tmp_path / "redis_password").write_text("s3cret-pw\n")
    fake = tmp_path / "bin" / "kvrelay"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$KVRELAY_REGISTRY"\nfor a in "$@"; do echo "[$a]"; done\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    out = subprocess.run([*entrypoint, *svc["command"]], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "redis://:s3cret-pw@redis:6379/0"
    assert lines[1:] == [f"[{a}]" for a in svc["command"]]
    (tmp_path / "redis_password").unlink()
    out = subprocess.run([*entrypoint, *svc["command"]], capture_output=True, text=True, env=env)
    assert out.returncode != 0, "without the secret the container must not start unauthenticated"


def test_redis_starts_with_the_password_and_its_healthcheck_uses_it(config, secrets_dir, tmp_path):
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server/redis-cli are not installed (`make setup` installs them)")
    svc = config["services"]["redis"]
    local = free_port()
    fix = lambda s: unescape(s).replace("/run/secrets/", f"{secrets_dir}/")  # noqa: E731
    command = [fix(p) for p in svc["command"]]
    command[-1] += f" --port {local} --bind 127.0.0.1 --dir {tmp_path}"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        check = fix(svc["healthcheck"]["test"][1]).replace("redis-cli ping", f"redis-cli -p {local} ping")
        deadline = time.monotonic() + 10
        while subprocess.run(["sh", "-c", check]).returncode != 0:
            assert time.monotonic() < deadline, "redis never answered its healthcheck"
            time.sleep(0.1)
        anonymous = subprocess.run([cli, "-p", str(local), "ping"], capture_output=True, text=True)
        assert "PONG" not in anonymous.stdout, "Redis answers without the password"
        import redis

        url = (secrets_dir / "redis_url").read_text().replace("@redis:6379", f"@127.0.0.1:{local}")
        assert redis.Redis.from_url(url).ping(), "the URL make-secrets.sh wrote (k8s: kvrelay-redis/url) works"
    finally:
        proc.terminate()
        proc.wait(10)


def test_mutual_tls_works_with_the_issued_certificate_and_server_name(config, secrets_dir):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from common.rpc.tls import TLSSettings

    env = config["services"]["gateway"]["environment"]
    files = {s: secrets_dir / Path(config["secrets"][s]["file"]).name for s in ("tls_ca", "tls_cert", "tls_key")}
    tls = TLSSettings(
        ca_file=str(files["tls_ca"]),
        cert_file=str(files["tls_cert"]),
        key_file=str(files["tls_key"]),
        server_name=env["KVRELAY_TLS__SERVER_NAME"],
    )
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    server.start()
    try:
        # Dialled by IP, as a worker is by pod or container IP: the name override makes it verify.
        with grpc.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(), tls.channel_options()) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Without the name the IP does not match the certificate; without a client certificate the
        # server refuses: both fail.
        without_name = TLSSettings(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file)
        no_client_cert = grpc.ssl_channel_credentials(files["tls_ca"].read_bytes())
        for creds, options in ((without_name.channel_credentials(), []), (no_client_cert, tls.channel_options())):
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options) as ch, pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        server.stop(0)


def test_make_secrets_keeps_what_exists_and_protects_it(secrets_dir):
    before = {p.name: p.read_bytes() for p in secrets_dir.iterdir()}
    assert len(before["shared_secret"].strip()) >= 16
    assert b"\n" not in before["redis_password"], "a trailing newline would become part of the password in k8s"
    subprocess.run(["sh", str(MAKE_SECRETS), str(secrets_dir)], check=True, capture_output=True)
    assert {p.name: p.read_bytes() for p in secrets_dir.iterdir()} == before
    assert secrets_dir.stat().st_mode & 0o077 == 0
    assert (secrets_dir / "ca.key").stat().st_mode & 0o077 == 0
