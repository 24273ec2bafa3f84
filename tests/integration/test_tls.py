"""TLS at the edge and mutual TLS inside: the gateway serves HTTPS that the `openai` client
accepts; every gRPC hop (gateway → workers, decode → prefill) runs over mTLS; a worker refuses a
client with no certificate, or with one from another CA."""

from __future__ import annotations

import asyncio
import os

import grpc
import httpx
import openai

from bench import tls_ca
from common.rpc import worker_pb2, worker_pb2_grpc
from gateway.api_keys import KeyStore
from kvrelay.launcher import free_port
from tests.waiting import wait_for


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            await worker_pb2_grpc.WorkerServiceStub(channel).Health(worker_pb2.HealthRequest(), timeout=3)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_https_at_the_edge_and_mutual_tls_inside(cluster_factory, tiny_dir, tmp_path):
    ca = tls_ca.TestCA(tmp_path / "pki")
    cert, key = ca.issue("kvrelay-service")
    env = {
        "KVRELAY_TLS__CA_FILE": str(ca.ca_file),
        "KVRELAY_TLS__CERT_FILE": str(cert),
        "KVRELAY_TLS__KEY_FILE": str(key),
    }
    run = cluster_factory(tiny_dir, prefill=1, decode=1, env=env)  # the P/D path below crosses both mTLS hops

    # A second gateway over HTTPS in front of the same workers, reached by the official client.
    port = free_port()
    run.cluster.gateway(
        port,
        run.prefill,
        run.decode,
        tiny_dir,
        ["--scheduler-config", os.path.join(tmp_path, "scheduler-force-pd.yaml")],
    )
    # (and with the default of no routing headers: clients learn no worker address, id or cache hint)
    # ... that requires an API key, as any gateway off loopback does
    keys_file = tmp_path / "keys.json"
    api_key, _ = KeyStore(str(keys_file)).add("tls-test")
    https_env = {
        "KVRELAY_HTTPS_CERT_FILE": str(cert),
        "KVRELAY_HTTPS_KEY_FILE": str(key),
        "KVRELAY_ROUTING_HEADERS": "false",
        "KVRELAY_AUTH__ENABLED": "true",
        "KVRELAY_AUTH__KEYS_FILE": str(keys_file),
    }
    run.cluster.procs.pop()[1].terminate()  # respawn it with HTTPS settings of its own
    run.cluster.spawn(
        f"gateway-https-{port}",
        ["gateway", "--host", "127.0.0.1", "--port", str(port), "--model", tiny_dir, "--log-level", "warning",
         "--prefill", run.prefill[0], "--decode", run.decode[0],
         "--scheduler-config", os.path.join(tmp_path, "scheduler-force-pd.yaml")],
        https_env,
    )  # fmt: skip
    base = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/ready", verify=str(ca.ca_file), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "the HTTPS gateway to be ready")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, http_client=httpx.Client(verify=str(ca.ca_file)))
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].finish_reason == "length"
    raw = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {api_key}"},
        verify=str(ca.ca_file),
        timeout=60,
    )
    assert raw.status_code == 200 and raw.headers["x-request-id"]
    assert not [h for h in raw.headers if h.startswith("x-kvrelay-")], raw.headers
    assert run.prefill[0] not in raw.text and run.decode[0] not in raw.text
    # plain HTTP to the HTTPS port does not get an answer
    try:
        plain = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3).status_code
    except httpx.HTTPError:
        plain = None
    assert plain != 200

    # and through the mTLS cluster's own gateway, disaggregated (decode pulls KV from prefill over mTLS)
    r = httpx.post(
        f"{run.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-kvrelay-mode"] == "disaggregated", r.text

    rogue = tls_ca.TestCA(tmp_path / "rogue", name="rogue-ca")
    rogue_cert, rogue_key = rogue.issue("intruder")
    trusted_ca = ca.ca_file.read_bytes()
    for address in (run.prefill[0], run.decode[0]):
        assert asyncio.run(_health(address, None)) == grpc.StatusCode.UNAVAILABLE  # plaintext
        no_cert = grpc.ssl_channel_credentials(root_certificates=trusted_ca)
        assert asyncio.run(_health(address, no_cert)) == grpc.StatusCode.UNAVAILABLE
        other_ca = grpc.ssl_channel_credentials(trusted_ca, rogue_key.read_bytes(), rogue_cert.read_bytes())
        assert asyncio.run(_health(address, other_ca)) == grpc.StatusCode.UNAVAILABLE
        good = grpc.ssl_channel_credentials(trusted_ca, key.read_bytes(), cert.read_bytes())
        assert asyncio.run(_health(address, good)) == grpc.StatusCode.OK
