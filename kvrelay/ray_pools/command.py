"""`kvrelay ray up|scale|status`: gateway and worker pools as Ray actors.

`up` connects to a Ray cluster (or starts one on this machine), starts Redis for the registry if
none is given, creates the pool controller and its members, prints the gateway URL once `/ready`
answers, and stays in the foreground: Ctrl-C or SIGTERM drains and stops every pool. `scale` and
`status` talk to the controller of a running `up` on the same cluster.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import tempfile
import threading
import time

import httpx
import typer

from kvrelay.ray_pools.controller import CONTROLLER, NAMESPACE, ROLES, PoolController, PoolSpec

ray_app = typer.Typer(no_args_is_help=True, help="gateway and worker pools as Ray actors")

ADDRESS = typer.Option(None, "--address", help="Ray cluster: ray://host:10001, host:6379 or auto (default: auto)")
_READY_TIMEOUT_S = 600.0


_CONNECT_TIMEOUT_S = 60.0


def _connect(address: str | None, start_local: bool = False) -> None:
    """Join the Ray cluster; a head that is still starting (or a loaded machine) gets a minute."""
    import ray

    if address is None and start_local:
        ray.init(namespace=NAMESPACE, log_to_driver=False, include_dashboard=False)
        return
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while True:
        try:
            ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
            return
        except ConnectionError as e:
            if time.monotonic() > deadline:
                typer.echo(f"error: cannot reach the Ray cluster at {address or 'auto'}: {e}", err=True)
                raise typer.Exit(1) from None
            time.sleep(2.0)


def _controller():  # noqa: ANN202 - a Ray actor handle
    import ray

    try:
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        typer.echo("no kvrelay pools run on this Ray cluster (start them with `kvrelay ray up`)", err=True)
        raise typer.Exit(1) from None


def _loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


def _settings_env(host: str | None) -> dict[str, str]:
    """Every KVRELAY_* setting of this shell goes to every member; API keys are off only on loopback
    (as with `kvrelay up`), unless set explicitly."""
    env = {k: v for k, v in os.environ.items() if k.startswith("KVRELAY_")}
    if _loopback(host) and "KVRELAY_AUTH__ENABLED" not in env:
        env["KVRELAY_AUTH__ENABLED"] = "false"
        typer.echo(
            "API keys are off: every member listens on loopback (set KVRELAY_AUTH__ENABLED=true to require them)"
        )
    return env


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready within {timeout:.0f}s")


@ray_app.command("up")
def up(
    address: str = ADDRESS,
    port: int = typer.Option(8000, help="first gateway's HTTP port (gateway i: port + i; 0: free ports)"),
    prefill: int = typer.Option(1, help="prefill workers (0: colocated mode)"),
    decode: int = typer.Option(1, help="decode workers"),
    gateway: int = typer.Option(1, help="gateways"),
    model: str = typer.Option(None, help="GGUF file or safetensors directory, at this path on every node"),
    registry: str = typer.Option(
        None,
        envvar="KVRELAY_REGISTRY",
        help="redis:// URL of the registry (default: a password-protected redis-server started here)",
    ),
    host: str = typer.Option(None, help="address members listen on (default: each node's IP)"),
    transfer: str = typer.Option("grpc", help="KV transfer backend of the workers: grpc or nixl"),
    prefill_cpus: float = typer.Option(1.0, help="Ray CPUs (and engine threads) per prefill worker"),
    decode_cpus: float = typer.Option(1.0, help="Ray CPUs (and engine threads) per decode worker"),
    gateway_cpus: float = typer.Option(0.5, help="Ray CPUs per gateway"),
    gpus: float = typer.Option(0.0, help="GPUs per worker (prefill and decode)"),
) -> None:
    """Start the pools on a Ray cluster and serve until Ctrl-C (which drains and stops them)."""
    import ray

    from kvrelay.redis_server import redis_server

    if decode < 1 or gateway < 1 or prefill < 0:
        raise typer.BadParameter("at least one decode worker and one gateway; prefill may be 0")
    if transfer not in ("grpc", "nixl"):
        raise typer.BadParameter("use grpc or nixl", param_hint="--transfer")
    _connect(address, start_local=address is None)
    node_ip = host or ray.util.get_node_ip_address()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        if registry is None:  # a password-protected one of our own, for this run only
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrelay-ray-redis-"))
            registry = stack.enter_context(redis_server(workdir, password=secrets.token_hex(16), host=node_ip))
        spec = PoolSpec(
            registry=registry,
            model=model,
            host=host,
            gateway_port=port,
            cpus={"prefill": prefill_cpus, "decode": decode_cpus, "gateway": gateway_cpus},
            gpus={"prefill": gpus, "decode": gpus, "gateway": 0.0},
            env=_settings_env(host),
            worker_args=["--transfer", transfer],
        )
        controller = (
            ray.remote(PoolController)
            .options(name=CONTROLLER, namespace=NAMESPACE, num_cpus=0, max_concurrency=8)
            .remote(spec)
        )
        try:
            for role, n in (("prefill", prefill), ("decode", decode), ("gateway", gateway)):
                if n:
                    typer.echo(f"starting {n} {role} member(s)")
                    ray.get(controller.scale.remote(role, n))
            urls = ray.get(controller.gateway_urls.remote())
            for url in urls:
                _wait_ready(url, _READY_TIMEOUT_S)
            typer.echo(f"kvrelay is serving at {' '.join(urls)}  (Ctrl-C drains and stops the pools)", err=False)
            while not stop.wait(1.0):
                pass
        finally:
            typer.echo("draining and stopping the pools")
            with contextlib.suppress(Exception):
                ray.get(controller.shutdown.remote())
            ray.kill(controller)
    typer.echo("stopped")


@ray_app.command("scale")
def scale(
    role: str = typer.Argument(..., help="prefill, decode or gateway"),
    n: int = typer.Argument(..., help="members wanted"),
    address: str = ADDRESS,
) -> None:
    """Resize one pool of a running `kvrelay ray up` (scale-down drains, losing no request)."""
    import ray

    if role not in ROLES:
        raise typer.BadParameter(f"use one of {', '.join(ROLES)}", param_hint="ROLE")
    _connect(address)
    try:
        sizes = ray.get(_controller().scale.remote(role, n))
    except ray.exceptions.RayTaskError as e:
        typer.echo(f"error: {e.cause if hasattr(e, 'cause') else e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(" ".join(f"{r}={sizes[r]}" for r in ROLES))


@ray_app.command("status")
def status(address: str = ADDRESS) -> None:
    """The pools of a running `kvrelay ray up`: each member, its address and whether it is up."""
    import ray

    _connect(address)
    members = ray.get(_controller().status.remote())
    sizes = {r: sum(1 for m in members if m["role"] == r) for r in ROLES}
    typer.echo(" ".join(f"{r}={sizes[r]}" for r in ROLES))
    for m in members:
        state = "up" if m.get("alive") else m.get("state", "down")
        typer.echo(f"  {m['name']:<12} {m['role']:<8} {m['address'] or '-':<22} {state}")
