"""The `kvrelay` command."""

from __future__ import annotations

import asyncio
import logging
import uuid

import typer

from bench.cli import bench_app
from kvrelay import roles
from kvrelay.keys_command import keys_app
from kvrelay.models_command import models_app
from kvrelay.plan_command import plan
from kvrelay.ray_pools.command import ray_app
from kvrelay.route_command import route_app
from kvrelay.trace_cli import trace_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="kvrelay: disaggregated prefill/decode LLM serving")
app.add_typer(bench_app, name="bench")
app.add_typer(trace_app, name="trace")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(ray_app, name="ray")
app.add_typer(route_app, name="route")
roles.register(app)
app.command("plan")(plan)


@app.command()
def up(
    port: int = typer.Option(8000, help="gateway HTTP port (0: pick a free one)"),
    prefill: int = typer.Option(1, help="prefill workers (0: colocated mode)"),
    decode: int = typer.Option(1, help="decode workers"),
    transfer: str = typer.Option("grpc", help="KV transfer backend: grpc or nixl"),
    model: str = typer.Option(None, help="GGUF file or safetensors directory (default: SmolLM2-135M-Instruct)"),
    host: str = typer.Option("127.0.0.1", help="address every process listens on"),
    base_port: int = typer.Option(
        None,
        help="first worker gRPC port (default 50051; decode from +10; metrics on each + 1000); "
        "0: pick every worker's gRPC and metrics port free",
    ),
    log_dir: str = typer.Option(None, help="write each process's log here"),
    registry: str = typer.Option(None, help="redis:// URL: workers register there and the gateway discovers them"),
    models: str = typer.Option(None, help="serve several models: comma-separated repository ids or paths"),
    memory_budget_mb: int = typer.Option(
        None, "--memory-budget-mb", help="with --models: most memory each worker's models may take together"
    ),
) -> None:
    """Start a gateway and its workers as separate processes on this machine."""
    from kvrelay.launcher import up as run_up

    if decode < 1:
        raise typer.BadParameter("at least one decode worker is needed", param_hint="--decode")
    if transfer not in ("grpc", "nixl"):
        raise typer.BadParameter("use grpc or nixl", param_hint="--transfer")
    code = run_up(port, prefill, decode, transfer, model, host, base_port, log_dir, registry, models, memory_budget_mb)
    raise typer.Exit(code)


@app.command()
def chat(
    prompt: str = typer.Argument(..., help="the user message"),
    model: str = typer.Option(None, help="GGUF file or safetensors directory (default: SmolLM2-135M-Instruct)"),
    max_tokens: int = typer.Option(128, help="most tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    threads: int = typer.Option(None, help="torch threads"),
) -> None:
    """Answer one message in-process on the real model and print the reply as it is generated."""
    from common.config import EngineConfig
    from common.engine.async_engine import AsyncEngine
    from common.engine.factory import build_engine
    from common.engine.sampling import SamplingParams
    from common.errors import KVRelayError

    logging.basicConfig(level=logging.WARNING)
    try:
        engine = build_engine(EngineConfig(model=model, threads=threads))
        params = SamplingParams.create(max_tokens=max_tokens, temperature=temperature)
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    except KVRelayError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e

    async def run() -> None:
        runner = AsyncEngine(engine)
        out_ids: list[int] = []
        printed = ""
        try:
            async for out in runner.generate(uuid.uuid4().hex, ids, params):
                out_ids += out.new_token_ids
                text = engine.tokenizer.decode(out_ids)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    typer.echo(text[len(printed) :], nl=False)
                    printed = text
        finally:
            runner.shutdown()
        typer.echo()

    asyncio.run(run())


if __name__ == "__main__":
    app()
