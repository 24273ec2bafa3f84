"""The NIXL/UCX agent listens where the worker's settings say: with a loopback worker, only on
loopback (UCX alone would listen on every interface of the machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvtransfer.nixl_backend import nixl_available, restrict_ucx


def _listening(net_devices: str, host: str) -> list[str]:
    """The TCP addresses a fresh process's NIXL agent listens on."""
    code = (
        "import os, subprocess, sys, torch\n"
        "from kvtransfer.nixl_backend import restrict_ucx\n"
        "restrict_ucx(sys.argv[1] or None, sys.argv[2])\n"
        "from nixl._api import nixl_agent, nixl_agent_config\n"
        "a = nixl_agent('probe', nixl_agent_config(backends=['UCX'], enable_prog_thread=False))\n"
        "a.register_memory(torch.zeros(256))\n"
        "mine = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout\n"
        "print(*('LISTEN ' + l.split()[3] for l in mine.splitlines() if f'pid={os.getpid()},' in l), sep='\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    r = subprocess.run(
        [sys.executable, "-c", code, net_devices, host], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return [line.split()[1] for line in r.stdout.splitlines() if line.startswith("LISTEN ")]


def _external_ipv4() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


needs_nixl = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")


@needs_nixl
def test_a_loopback_worker_agent_listens_on_loopback_only():
    external = _external_ipv4()
    if external is None:
        pytest.skip("this machine has no external IPv4 address to compare with")
    everywhere = _listening("", "0.0.0.0")
    assert any(a.startswith(external + ":") for a in everywhere), everywhere  # what UCX does unrestricted
    loopback = _listening("", "127.0.0.1")
    assert loopback, "the agent listens nowhere: NIXL pulls could not reach it"
    assert all(a.startswith("127.0.0.1:") for a in loopback), loopback


def test_the_operators_ucx_net_devices_wins(monkeypatch):
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")
    assert restrict_ucx("eth0", "127.0.0.1") == "mlx5_0:1"


def test_devices_from_settings_then_loopback_default(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert restrict_ucx("eth1", "0.0.0.0") == "eth1"
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert restrict_ucx(None, "0.0.0.0") is None
    assert restrict_ucx(None, "127.0.0.1") == "lo"
