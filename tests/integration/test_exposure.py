"""What a gateway shows the network: with an internal port, readiness (which lists the workers) and
metrics (which reveal load) are served only there, on loopback; the public port keeps liveness."""

from __future__ import annotations

import httpx

from kvrelay.launcher import free_port
from tests.waiting import wait_for


def test_ops_endpoints_move_to_the_internal_port(tiny_cluster, tiny_dir):
    public, internal = free_port(), free_port()
    args = ["gateway", "--host", "127.0.0.1", "--port", str(public), "--model", tiny_dir, "--log-level", "warning"]
    args += ["--prefill", tiny_cluster.prefill[0], "--decode", tiny_cluster.decode[0]]
    proc = tiny_cluster.cluster.spawn(
        f"gateway-internal-{public}", args, {"KVRELAY_INTERNAL_PORT": str(internal), "KVRELAY_AUTH__ENABLED": "false"}
    )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{internal}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "the internal port to report ready")
        assert httpx.get(f"http://127.0.0.1:{internal}/metrics").text.count("kvrelay_gateway_info") >= 1
        assert httpx.get(f"http://127.0.0.1:{public}/health").status_code == 200
        for path in ("/ready", "/metrics"):
            assert httpx.get(f"http://127.0.0.1:{public}{path}").status_code == 404, path
    finally:
        proc.terminate()
        proc.wait(30)
