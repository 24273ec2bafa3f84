"""`kvrelay up` starts every role, serves, and leaves no process behind on SIGTERM."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from kvrelay.launcher import METRICS_OFFSET, divide_cores, plan_ports
from tests.tiny_checkpoint import write_tiny_checkpoint


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_core_division():
    assert divide_cores(2, 1, 1).prefill_threads == 1 and divide_cores(2, 1, 1).decode_threads == 1
    plan = divide_cores(16, 1, 1)
    assert plan.prefill_threads + plan.decode_threads == 16
    plan = divide_cores(16, 2, 2)
    assert 2 * plan.prefill_threads + 2 * plan.decode_threads <= 16
    assert divide_cores(2, 2, 2).prefill_threads == 1  # oversubscribed: one thread each, and it says so
    assert "share" in divide_cores(2, 2, 2).note
    assert divide_cores(8, 0, 2).decode_threads == 4


def test_default_ports_are_the_documented_ones():
    plan = plan_ports(8000, None, prefill=2, decode=2)
    assert (plan.gateway, plan.prefill, plan.decode) == (8000, [50051, 50052], [50061, 50062])
    assert plan_ports(9000, 40000, 1, 1).decode == [40010]


def test_port_zero_picks_free_distinct_ports_with_their_metrics_ports():
    plan = plan_ports(0, 0, prefill=2, decode=2)
    workers = plan.prefill + plan.decode
    ports = [plan.gateway, *workers, *(p + METRICS_OFFSET for p in workers)]
    assert len(set(ports)) == len(ports) == 9 and 0 not in ports
    for p in ports:  # nothing listens there
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    assert plan_ports(0, None, 1, 1).prefill == [50051]  # only the gateway's is picked


@pytest.mark.parametrize("with_registry", [False, True], ids=["static", "redis"])
def test_up_serves_and_stops_cleanly(tiny_dir, tmp_path, request, with_registry):
    registry = ["--registry", request.getfixturevalue("redis_url")] if with_registry else []
    # With the registry, two models on every worker (a second tiny one beside the first).
    second = str(write_tiny_checkpoint(tmp_path / "tiny-second", seed=1)) if with_registry else None
    models = ["--models", f"{tiny_dir},{second}", "--memory-budget-mb", "1024"] if second else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "up",
            "--port",
            "0",  # every port, the workers' metrics ports too, picked free at start
            "--base-port",
            "0",
            "--model",
            tiny_dir,
            "--log-dir",
            str(tmp_path),
            *registry,
            *models,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "ready at" in line or not line:
                break
        out = "".join(lines)
        ready = re.search(r"ready at (http://\S+)/v1", out)
        assert ready, out
        assert "cores:" in out, "kvrelay up must say how it divided the cores"
        workers = dict(re.findall(r"kvrelay up: (\w+) worker at \S+ \(metrics (\S+)\)", out))
        assert set(workers) == {"prefill", "decode"}, out
        kids = children_of(proc.pid)
        assert len(kids) == 3  # gateway, prefill, decode
        r = httpx.post(
            f"{ready.group(1)}/v1/completions",
            timeout=30,
            json={"model": Path(tiny_dir).name, "prompt": "hello", "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        if second:
            listed = [m["id"] for m in httpx.get(f"{ready.group(1)}/v1/models", timeout=10).json()["data"]]
            assert listed == [Path(tiny_dir).name, "tiny-second"]
            body = {"model": "tiny-second", "prompt": "hello", "max_tokens": 4}
            assert httpx.post(f"{ready.group(1)}/v1/completions", timeout=30, json=body).status_code == 200
        for role, metrics in workers.items():  # each worker serves its metrics where `up` said
            text = httpx.get(f"http://{metrics}/metrics", timeout=5).text
            assert f'role="{role}"' in text, text[:500]
        if with_registry:
            records = redis.Redis.from_url(registry[1]).keys("kvrelay:worker:*")
            assert len(records) == 2, "both workers registered, and the gateway found them there"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # `up` returns only after reaping every child (Cluster.stop waits for each), so none may be left
        assert not [k for k in kids if alive(k)], "kvrelay up left processes behind"
        if with_registry:
            assert not redis.Redis.from_url(registry[1]).keys("kvrelay:*"), "workers deregister as they stop"
    finally:
        if proc.poll() is None:
            proc.kill()
