"""`kvrelay ray`: pools as Ray actors on a local Ray instance (a real `ray start --head` on
loopback). Under steady traffic, decode scales 1 → 2 → 1 with no failed request and no leaked KV;
a killed member actor comes back (Ray restarts it); Ctrl-C drains and stops everything."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from kvrelay.launcher import free_port
from tests.integration.conftest import check_no_kv_held
from tests.waiting import wait_for

pytest.importorskip("ray")
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")


def _kvrelay(*args: str, timeout: float = 180) -> str:
    r = subprocess.run([sys.executable, "-m", "kvrelay.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"kvrelay {' '.join(args)}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture
def ray_head(tmp_path, monkeypatch) -> Iterator[str]:
    """A head with token authentication, the token of this test only: every process of the test
    (and what they start) finds it through the environment."""
    if RAY is None:
        pytest.skip("the ray command is not installed")
    token = tmp_path / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    env = dict(os.environ)
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "8"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats", "--ray-client-server-port", str(free_port())]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=env)
    address = f"127.0.0.1:{port}"  # `kvrelay ray` waits for a head that is still starting
    try:
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)


def _status(address: str) -> dict[str, dict]:
    out = _kvrelay("ray", "status", "--address", address, timeout=60)
    members = {}
    for line in out.splitlines()[1:]:
        name, role, addr, state = line.split()
        members[name] = {"role": role, "address": addr, "state": state}
    return members


class _Load:
    """Streamed chat requests, two at a time, until stopped; counts what finished well and what did not."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed = url, 0, []
        self.model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _one(self, client: httpx.Client) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "count the ships in the harbour"}],
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
        with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                self.failed.append(f"HTTP {r.status_code}: {r.read()[:200]!r}")
                return
            done = False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        self.failed.append(str(obj["error"]))
                        return
            if not done:
                self.failed.append("stream ended without [DONE]")
            else:
                self.ok += 1

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    self._one(client)
                except httpx.HTTPError as e:
                    self.failed.append(repr(e))


def _ready_pool(url: str, role: str) -> list[str]:
    return httpx.get(f"{url}/ready", timeout=5).json()["workers"][role]["healthy"]


def test_ray_pools_scale_under_load_and_restart_a_killed_member(ray_head, tiny_dir, tmp_path):
    log_path = tmp_path / "ray-up.log"
    log = log_path.open("w")  # noqa: SIM115 - the child writes it while the test reads it back
    up = subprocess.Popen(
        [sys.executable, "-m", "kvrelay.cli", "ray", "up", "--address", ray_head, "--host", "127.0.0.1"]
        + ["--port", "0", "--prefill", "1", "--decode", "1", "--model", tiny_dir],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = ""

        def serving() -> bool:
            nonlocal url
            assert up.poll() is None, log_path.read_text()[-3000:]
            text = log_path.read_text()
            if "serving at " in text:
                url = text.split("serving at ", 1)[1].split()[0]
            return bool(url)

        wait_for(serving, 240, "kvrelay ray up to serve")
        assert "API keys are off" in log_path.read_text()  # loopback: it says so
        members = _status(ray_head)
        assert {m["role"] for m in members.values()} == {"prefill", "decode", "gateway"}
        assert all(m["state"] == "up" for m in members.values()), members

        with _Load(url) as load:
            wait_for(lambda: load.ok >= 3 or load.failed, 60, "traffic to flow")
            assert not load.failed, load.failed[:5]
            assert _kvrelay("ray", "scale", "decode", "2", "--address", ray_head).split()[1] == "decode=2"
            wait_for(lambda: len(_ready_pool(url, "decode")) == 2, 30, "the gateway to see two decode workers")
            before = load.ok
            wait_for(lambda: load.ok >= before + 4, 60, "traffic over two decode workers")
            assert _kvrelay("ray", "scale", "decode", "1", "--address", ray_head).split()[1] == "decode=1"
            wait_for(lambda: len(_ready_pool(url, "decode")) == 1, 30, "the gateway to drop the drained worker")
            before = load.ok
            wait_for(lambda: load.ok >= before + 3, 60, "traffic after scaling down")
        assert not load.failed, load.failed[:5]
        assert load.ok >= 10

        workers = [m["address"] for m in _status(ray_head).values() if m["role"] != "gateway"]
        check_no_kv_held(workers)

        # A member actor killed (its node's process gone): Ray restarts it, and it serves again.
        old = _status(ray_head)["decode-0"]["address"]
        kill = (
            f"import ray; ray.init(address={ray_head!r}, namespace='kvrelay', log_to_driver=False); "
            "ray.kill(ray.get_actor('decode-0', namespace='kvrelay'), no_restart=False)"
        )
        subprocess.run([sys.executable, "-c", kill], check=True, capture_output=True, timeout=120)

        def back() -> bool:
            m = _status(ray_head).get("decode-0", {})
            return m.get("state") == "up" and m.get("address") != old

        wait_for(back, 120, "Ray to restart the killed decode member", every=1.0)
        wait_for(lambda: len(_ready_pool(url, "decode")) == 1, 30, "the gateway to see the restarted worker")
        r = httpx.post(
            f"{url}/v1/completions", json={"model": load.model, "prompt": "again", "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200, r.text
        check_no_kv_held([m["address"] for m in _status(ray_head).values() if m["role"] != "gateway"])
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # what Ctrl-C does: drain and stop every pool
        code = up.wait(120)
        log.close()
        out = log_path.read_text()
    assert code == 0, out[-3000:]
    assert "stopped" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
