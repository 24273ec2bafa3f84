"""Workers answer the standard gRPC health service, as Kubernetes' native grpc probes ask it: on
the main port (behind mTLS when it is on) and, with `health_port`, alone on a plaintext port that
needs no certificate. SERVING while serving, NOT_SERVING from the start of a drain."""

from __future__ import annotations

import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import tls_ca
from common.rpc.tls import TLSSettings
from kvrelay.launcher import Cluster, free_port, free_worker_ports
from tests.waiting import wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel: grpc.Channel) -> int | grpc.StatusCode:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
    except grpc.RpcError as e:
        return e.code()


def _plain(address: str) -> int | grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        return _check(ch)


def test_health_on_the_mtls_port_and_alone_on_a_plaintext_port(tiny_dir, tmp_path):
    ca = tls_ca.TestCA(tmp_path / "pki")
    cert, key = ca.issue("kvrelay-service")
    tls = TLSSettings(ca_file=str(ca.ca_file), cert_file=str(cert), key_file=str(key))
    health_port = free_port()
    env = {
        "KVRELAY_TLS__CA_FILE": str(ca.ca_file),
        "KVRELAY_TLS__CERT_FILE": str(cert),
        "KVRELAY_TLS__KEY_FILE": str(key),
        "KVRELAY_HEALTH_PORT": str(health_port),
        "KVRELAY_DRAIN_NOTICE_S": "4",
    }
    cluster = Cluster(log_dir=str(tmp_path), env=env)
    try:
        address = cluster.worker("decode", free_worker_ports(1)[0], 1, tiny_dir)
        probe = f"127.0.0.1:{health_port}"
        wait_for(lambda: _plain(probe) == SERVING, 60, "the worker to report SERVING on its health port")
        with grpc.secure_channel(address, tls.channel_credentials()) as ch:
            assert _check(ch) == SERVING  # the same service on the main port, to a client with a certificate
        assert _plain(address) == grpc.StatusCode.UNAVAILABLE  # no certificate: the main port says nothing

        proc = cluster.procs[0][1]
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _plain(probe) == NOT_SERVING, 3, "the draining worker to report NOT_SERVING")
        assert proc.wait(30) == 0
    finally:
        cluster.stop()
