"""A redis-server of our own on a free port: for the tests and benchmarks that need a registry, and
for `kvrelay ray up` when no registry URL is given."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from kvrelay.launcher import free_port


@contextmanager
def redis_server(
    workdir: str, password: str | None = None, tls: bool = False, host: str = "127.0.0.1"
) -> Iterator[str]:
    """A redis-server on a free port; with `password`, clients must authenticate (it is in the URL);
    with `tls`, it speaks only TLS, with a certificate from a throwaway CA (`rediss://` URL that
    names the CA file)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; run `make setup` (apt-get install -y redis-server)")
    port = free_port(host)
    args = ["--port", str(port), "--bind", host, "--save", "", "--appendonly", "no", "--dir", workdir]
    query = ""
    if tls:
        from bench.tls_ca import TestCA

        ca = TestCA(Path(workdir) / "redis-pki", name="redis-test-ca")
        cert, key = ca.issue("redis")
        args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        args += ["--tls-ca-cert-file", str(ca.ca_file), "--tls-auth-clients", "no"]
        args += ["--bind", host, "--save", "", "--appendonly", "no", "--dir", workdir]
        query = f"?ssl_ca_certs={ca.ca_file}"
    proc = subprocess.Popen(
        [binary, *args] + (["--requirepass", password] if password else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    scheme = "rediss" if tls else "redis"
    auth = f":{password}@" if password else ""
    url = f"{scheme}://{auth}{host}:{port}/0{query}"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
