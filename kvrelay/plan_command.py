"""`kvrelay plan`: recommend (and, with an adapter, apply) the size of the prefill and decode pools
from the gateways' /metrics. The default adapter is a dry run; `--once` prints one look and exits."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from gateway.planner.adapters import ScaleAdapter

plan_app = typer.Typer(add_completion=False, help="Size the prefill and decode pools from the gateways' signals")
ADAPTERS = ("dry-run", "kubernetes", "ray")


def plan(
    gateway: list[str] = typer.Option(..., "--gateway", help="gateway URL (repeat for replicas); /metrics is added"),
    adapter: str = typer.Option("dry-run", help="dry-run (print only), kubernetes or ray"),
    interval: float = typer.Option(15.0, min=0.1, help="seconds between ticks"),
    once: bool = typer.Option(False, "--once", help="print one undamped recommendation and exit (applies nothing)"),
    ttft_slo: float = typer.Option(2.0, help="time to first token p95 SLO, seconds"),
    tpot_slo: float = typer.Option(0.1, help="time per output token p95 SLO, seconds"),
    prefill_waiting_target: float = typer.Option(2.0, help="queued prompts per prefill worker"),
    prefill_running_target: float = typer.Option(0.75, help="prompts being prefilled per prefill worker"),
    decode_running_target: float = typer.Option(32.0, help="sequences decoding or queued per decode worker"),
    decode_kv_target: float = typer.Option(0.7, help="fraction of decode KV blocks in use"),
    min_prefill: int = typer.Option(1),
    max_prefill: int = typer.Option(8),
    min_decode: int = typer.Option(1),
    max_decode: int = typer.Option(8),
    scale_down_window: float = typer.Option(300.0, help="seconds: shrink only to the largest need seen this long"),
    cooldown: float = typer.Option(45.0, help="seconds after a change before the next one"),
    token_file: str = typer.Option(
        None, envvar="KVRELAY_PLAN_TOKEN_FILE", help="bearer token for the gateways' /metrics, in a file"
    ),
    ca_file: str = typer.Option(None, help="CA bundle for https gateway URLs"),
    namespace: str = typer.Option("kvrelay", help="kubernetes: the pools' namespace"),
    prefill_deployment: str = typer.Option("prefill", help="kubernetes: the prefill Deployment"),
    decode_deployment: str = typer.Option("decode", help="kubernetes: the decode Deployment"),
    kube_api: str = typer.Option(None, help="kubernetes API URL (default: the in-cluster service account's)"),
    kube_token_file: str = typer.Option(None, help="with --kube-api: a file holding the API token"),
    kube_ca_file: str = typer.Option(None, help="with --kube-api: the API server's CA bundle"),
    ray_address: str = typer.Option("auto", help="ray: the cluster to connect to"),
    log_level: str = typer.Option("info"),
    log_format: str = typer.Option(None, envvar="KVRELAY_LOG_FORMAT", help="json or text"),
) -> None:
    """Recommend each pool's size every interval and apply it through the adapter."""
    from common.logs import configure_logging
    from gateway.planner.adapters import AdapterError
    from gateway.planner.loop import PlanLoop
    from gateway.planner.policy import Policy, PolicyConfig
    from gateway.planner.scrape import Scraper

    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape would drown the changes
    if adapter not in ADAPTERS:
        raise typer.BadParameter(f"use one of {', '.join(ADAPTERS)}", param_hint="--adapter")
    try:
        cfg = PolicyConfig(
            ttft_slo_s=ttft_slo,
            tpot_slo_s=tpot_slo,
            prefill_waiting_target=prefill_waiting_target,
            prefill_running_target=prefill_running_target,
            decode_running_target=decode_running_target,
            decode_kv_target=decode_kv_target,
            min_prefill=min_prefill,
            max_prefill=max_prefill,
            min_decode=min_decode,
            max_decode=max_decode,
            interval_s=interval,
            down_stabilization_s=scale_down_window,
            cooldown_s=cooldown,
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    deployments = {"prefill": prefill_deployment, "decode": decode_deployment}
    scraper = Scraper(gateway, token_file=token_file, ca_file=ca_file)
    try:
        target = _adapter(adapter, namespace, deployments, kube_api, kube_token_file, kube_ca_file, ray_address)
        policy = Policy(cfg)
        loop = PlanLoop(scraper.signals, policy, target)
        if once:
            signals = scraper.snapshot()
            if signals is None:
                typer.echo(f"error: no gateway answered at {', '.join(scraper.urls)}", err=True)
                raise typer.Exit(1)
            for rec in policy.once(signals, loop.current(signals)).values():
                typer.echo(rec.line())
            return
        loop.run(interval)
    except AdapterError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    except KeyboardInterrupt:
        pass
    finally:
        scraper.close()


def _adapter(
    kind: str,
    namespace: str,
    deployments: dict[str, str],
    kube_api: str | None,
    kube_token_file: str | None,
    kube_ca_file: str | None,
    ray_address: str,
) -> ScaleAdapter:
    if kind == "kubernetes":
        from gateway.planner.kubernetes import KubernetesAdapter

        if kube_api is None:
            return KubernetesAdapter.in_cluster(namespace, deployments)
        return KubernetesAdapter(kube_api, kube_token_file, kube_ca_file, namespace, deployments)
    if kind == "ray":
        from gateway.planner.ray_actor import RayAdapter

        return RayAdapter.connect(ray_address)
    from gateway.planner.adapters import DryRunAdapter

    return DryRunAdapter(typer.echo)


plan_app.command()(plan)
