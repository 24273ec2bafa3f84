"""`kvrelay up` starts every role, serves, and leaves no process behind on SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from kvrelay.launcher import divide_cores, free_port


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


@pytest.mark.parametrize("with_registry", [False, True], ids=["static", "redis"])
def test_up_serves_and_stops_cleanly(tiny_dir, tmp_path, request, with_registry):
    port = free_port()
    registry = ["--registry", request.getfixturevalue("redis_url")] if with_registry else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "up",
            "--port",
            str(port),
            "--base-port",
            str(free_port()),
            "--model",
            tiny_dir,
            "--log-dir",
            str(tmp_path),
            *registry,
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
        assert any("ready at" in x for x in lines), "".join(lines)
        assert any("cores:" in x for x in lines), "kvrelay up must say how it divided the cores"
        kids = children_of(proc.pid)
        assert len(kids) == 3  # gateway, prefill, decode
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            timeout=30,
            json={"model": Path(tiny_dir).name, "prompt": "hello", "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        if with_registry:
            records = redis.Redis.from_url(registry[1]).keys("kvrelay:worker:*")
            assert len(records) == 2, "both workers registered, and the gateway found them there"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        assert not [k for k in kids if alive(k)], "kvrelay up left processes behind"
        if with_registry:
            assert not redis.Redis.from_url(registry[1]).keys("kvrelay:*"), "workers deregister as they stop"
    finally:
        if proc.poll() is None:
            proc.kill()
