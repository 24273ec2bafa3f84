"""`kvrelay route set|show|rm`: model routes for canary, A/B and shadow traffic, kept in Redis (every
gateway) or in a routes file (one gateway); gateways pick up a change on their next refresh."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import redis
import typer
from pydantic import ValidationError

from common.settings import read_secret
from gateway.routes.spec import JudgeSpec, RouteSpec, explain, parse_shadow, parse_variants
from gateway.routes.store import MemoryRouteStore, RedisRouteStore, RouteStore
from kvrelay.keys_command import PREFIX, REGISTRY, SECRET

route_app = typer.Typer(no_args_is_help=True, help="Model routes: canary, A/B and shadow traffic, judged on SLOs")
FILE = typer.Option(None, "--file", envvar="KVRELAY_ROUTES_FILE", help="routes file (JSON or YAML) of one gateway")


def _store(file: str | None, registry: str | None, prefix: str, secret_file: str | None) -> RouteStore:
    if registry:
        return RedisRouteStore.from_url(registry, prefix, read_secret(secret_file))
    if file:
        return MemoryRouteStore.from_file(file)
    typer.echo("error: say where routes live: --registry redis://... (every gateway) or --file routes.yaml", err=True)
    raise typer.Exit(2)


@contextmanager
def _reaching_the_store() -> Iterator[None]:
    try:
        yield
    except (redis.RedisError, OSError, ValueError) as e:
        raise _fail(f"could not use the route store: {e}") from e


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@route_app.command("set")
def set_route(
    name: str = typer.Argument(..., help="the public model name clients send"),
    variants: str = typer.Option(..., help="NAME=MODEL:WEIGHT,..., e.g. stable=modelA:90,canary=modelB:10"),
    baseline: str = typer.Option(None, help="the variant rollbacks fall back to (default: the first)"),
    sticky: bool = typer.Option(True, "--sticky/--no-sticky", help="one user, one variant (by the API key)"),
    shadow: str = typer.Option(None, help="MODEL:PERCENT: copy that share of requests to MODEL, answers discarded"),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="let the SLO judge roll back and promote"),
    promote_steps: str = typer.Option(None, help="canary percentages to step through when healthy, e.g. 10,25,50,100"),
    promote_after_s: float = typer.Option(120.0, help="healthy seconds at a step before the next"),
    min_requests: int = typer.Option(20, help="requests per variant in the window before it is judged"),
    window_s: float = typer.Option(60.0, help="the judge's sliding window, seconds"),
    max_error_rate_delta: float = typer.Option(0.05, help="roll back above the baseline's error rate plus this"),
    max_ttft_p95_ratio: float = typer.Option(1.5, help="roll back above the baseline's TTFT p95 times this"),
    max_tpot_p95_ratio: float = typer.Option(1.5, help="roll back above the baseline's TPOT p95 times this"),
    file: str = FILE,
    registry: str = REGISTRY,
    prefix: str = PREFIX,
    secret_file: str = SECRET,
) -> None:
    """Create or replace a route (clears a rollback record)."""
    try:
        steps = [int(s) for s in promote_steps.split(",")] if promote_steps else []
    except ValueError as e:
        raise _fail(f"--promote-steps should be comma-separated integers, got {promote_steps!r}") from e
    try:
        spec = RouteSpec(
            name=name,
            variants=parse_variants(variants),
            baseline=baseline or "",
            sticky=sticky,
            shadow=parse_shadow(shadow) if shadow else None,
            judge=JudgeSpec(
                enabled=judge,
                min_requests=min_requests,
                window_s=window_s,
                max_error_rate_delta=max_error_rate_delta,
                max_ttft_p95_ratio=max_ttft_p95_ratio,
                max_tpot_p95_ratio=max_tpot_p95_ratio,
                promote_steps=steps,
                promote_after_s=promote_after_s,
            ),
        )
    except ValidationError as e:
        raise _fail(explain(e)) from e
    except ValueError as e:
        raise _fail(str(e)) from e
    with _reaching_the_store():
        stored = _store(file, registry, prefix, secret_file).set(spec)
    typer.echo(f"route {stored.name} is at revision {stored.revision}: {_weights(stored)}")


@route_app.command("show")
def show(
    name: str = typer.Argument(None, help="one route (default: all)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per route"),
    file: str = FILE,
    registry: str = REGISTRY,
    prefix: str = PREFIX,
    secret_file: str = SECRET,
) -> None:
    """Routes with their weights, revision and rollback record."""
    with _reaching_the_store():
        routes = _store(file, registry, prefix, secret_file).all()
    if name is not None:
        if name not in routes:
            raise _fail(f"no route named {name!r}")
        routes = {name: routes[name]}
    for spec in sorted(routes.values(), key=lambda r: r.name):
        if as_json:
            typer.echo(json.dumps(spec.model_dump(mode="json")))
        else:
            typer.echo(_describe(spec))


@route_app.command("rm")
def rm(
    name: str = typer.Argument(...),
    file: str = FILE,
    registry: str = REGISTRY,
    prefix: str = PREFIX,
    secret_file: str = SECRET,
) -> None:
    """Remove a route; its name stops resolving on each gateway's next refresh."""
    with _reaching_the_store():
        removed = _store(file, registry, prefix, secret_file).remove(name)
    if not removed:
        raise _fail(f"no route named {name!r}")
    typer.echo(f"removed route {name}")


def _weights(spec: RouteSpec) -> str:
    return ", ".join(f"{v.name}={v.model}:{v.weight}" for v in spec.variants)


def _describe(spec: RouteSpec) -> str:
    j = spec.judge
    lines = [
        f"{spec.name}  revision {spec.revision}  baseline {spec.baseline}  sticky {'yes' if spec.sticky else 'no'}"
    ]
    lines.append(f"  {'VARIANT':16}  {'MODEL':32}  {'WEIGHT':>6}  {'SHARE':>6}")
    for v in spec.variants:
        lines.append(f"  {v.name[:16]:16}  {v.model[:32]:32}  {v.weight:>6}  {spec.share(v):>5.1f}%")
    if spec.shadow is not None:
        lines.append(f"  shadow: {spec.shadow.percent:g}% of requests also go to {spec.shadow.model}")
    if j.enabled:
        steps = (
            f"; promote through {','.join(map(str, j.promote_steps))}% after {j.promote_after_s:g} s"
            if j.promote_steps
            else ""
        )
        lines.append(
            f"  judge: {j.min_requests}+ requests in {j.window_s:g} s; error rate +{j.max_error_rate_delta:g}, "
            f"TTFT p95 x{j.max_ttft_p95_ratio:g}, TPOT p95 x{j.max_tpot_p95_ratio:g}{steps}"
        )
    else:
        lines.append("  judge: off")
    if spec.rolled_back is not None:
        rb = spec.rolled_back
        when = datetime.fromtimestamp(rb.at).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"  ROLLED BACK {rb.variant} at {when}: {rb.reason}")
        lines.append("  (the judge leaves this route alone until it is set again)")
    return "\n".join(lines)
