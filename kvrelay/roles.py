"""`kvrelay prefill|decode|gateway`: one role per process (what compose, k8s and Ray run)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer

from common.settings import GatewaySettings, WorkerSettings, load_settings

REGISTRY = typer.Option(None, help="redis://host:port URL of the worker registry (default: none)")
CONFIG = typer.Option(None, "--config", help="YAML settings file (flags and KVRELAY_* env override it)")


LOG_FORMAT = typer.Option(
    None, "--log-format", envvar="KVRELAY_LOG_FORMAT", help="json or text (default: text on a terminal, else json)"
)


def _logging(level: str, fmt: str | None = None) -> None:
    from common.logs import configure_logging

    configure_logging(level, fmt)  # type: ignore[arg-type]


MODELS = typer.Option(
    None, help="serve several models: comma-separated repository ids or paths (default: --model alone)"
)
MEMORY_BUDGET = typer.Option(
    None,
    "--memory-budget-mb",
    help="most memory the models may take together; others load on demand, the least recently used idle one "
    "making room (default: no budget)",
)
POOL = typer.Option(None, help="the worker pool this worker belongs to (a workload class may be kept to it)")
PRELOAD = typer.Option(None, help="comma-separated model ids to load at start (default: all that fit)")


def _ids(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _serve_role(role: str, config: Path | None, log_level: str, log_format: str | None, **flags: object) -> None:
    """Build the role's settings (flags over env over YAML) and run the worker until signalled."""
    _logging(log_level, log_format)
    engine = {k: flags.pop(k) for k in ("model", "threads", "kv_cache_mb", "block_size") if k in flags}
    for key in ("models", "preload"):
        flags[key] = _ids(flags.get(key))  # type: ignore[arg-type]
    settings = load_settings(WorkerSettings, config, role=role, engine=engine, **flags)
    if settings.role == "prefill":
        from prefill_worker.server import serve
    else:
        from decode_worker.server import serve
    from common.errors import KVRelayError

    try:
        asyncio.run(serve(settings))
    except KVRelayError as e:  # a model that will not load, an unreachable registry: say so, no traceback
        logging.getLogger("kvrelay").error("%s worker cannot start: %s", settings.role, e)
        raise typer.Exit(2) from e


def register(app: typer.Typer) -> None:
    @app.command()
    def prefill(
        port: int = typer.Option(None, help="gRPC port (default 50051); metrics on port + 1000"),
        host: str = typer.Option(None, help="listen address (default 127.0.0.1)"),
        model: str = typer.Option(None, help="repository id, GGUF file or safetensors directory"),
        models: str = MODELS,
        memory_budget_mb: int = MEMORY_BUDGET,
        preload: str = PRELOAD,
        threads: int = typer.Option(None, help="torch threads for this worker"),
        kv_cache_mb: int = typer.Option(None, help="KV cache size"),
        block_size: int = typer.Option(None, help="tokens per KV block (default 16)"),
        transfer: str = typer.Option(None, help="grpc (default) or nixl: nixl also serves NIXL pulls (a UCX agent)"),
        worker_id: str = typer.Option(None),
        pool: str = POOL,
        registry: str = REGISTRY,
        config: Path = CONFIG,
        log_level: str = typer.Option("info"),
        log_format: str = LOG_FORMAT,
    ) -> None:
        """Run a prefill worker."""
        _serve_role(
            "prefill",
            config,
            log_level,
            log_format,
            port=port,
            host=host,
            model=model,
            models=models,
            memory_budget_mb=memory_budget_mb,
            preload=preload,
            threads=threads,
            kv_cache_mb=kv_cache_mb,
            block_size=block_size,
            transfer=transfer,
            worker_id=worker_id,
            pool=pool,
            registry=registry,
        )

    @app.command()
    def decode(
        port: int = typer.Option(None, help="gRPC port (default 50061); metrics on port + 1000"),
        host: str = typer.Option(None, help="listen address (default 127.0.0.1)"),
        model: str = typer.Option(None, help="repository id, GGUF file or safetensors directory"),
        models: str = MODELS,
        memory_budget_mb: int = MEMORY_BUDGET,
        preload: str = PRELOAD,
        threads: int = typer.Option(None, help="torch threads for this worker"),
        kv_cache_mb: int = typer.Option(None, help="KV cache size"),
        block_size: int = typer.Option(None, help="tokens per KV block (default 16)"),
        transfer: str = typer.Option(None, help="grpc or nixl: how KV is pulled"),
        prefill_peers: list[str] = typer.Option(
            None,
            "--prefill-peer",
            help="a prefill worker host:port this worker may pull KV from (repeat; registered ones count too)",
        ),
        worker_id: str = typer.Option(None),
        pool: str = POOL,
        registry: str = REGISTRY,
        config: Path = CONFIG,
        log_level: str = typer.Option("info"),
        log_format: str = LOG_FORMAT,
    ) -> None:
        """Run a decode worker (it can also prefill locally: colocated mode)."""
        _serve_role(
            "decode",
            config,
            log_level,
            log_format,
            port=port,
            host=host,
            model=model,
            models=models,
            memory_budget_mb=memory_budget_mb,
            preload=preload,
            threads=threads,
            kv_cache_mb=kv_cache_mb,
            block_size=block_size,
            transfer=transfer,
            prefill_peers=prefill_peers or None,
            worker_id=worker_id,
            pool=pool,
            registry=registry,
        )

    @app.command()
    def gateway(
        port: int = typer.Option(None, help="HTTP port (default 8000)"),
        host: str = typer.Option(None, help="listen address (default 127.0.0.1)"),
        model: str = typer.Option(None, help="repository id or path, for the tokenizer and chat template"),
        models: str = typer.Option(None, help="serve several models: comma-separated repository ids or paths"),
        prefill: list[str] = typer.Option(None, help="prefill worker address host:port (repeat)"),
        decode: list[str] = typer.Option(None, help="decode worker address host:port (repeat)"),
        scheduler_config: str = typer.Option(None, help="scheduler YAML: profiles, scorer weights, decider"),
        registry: str = REGISTRY,
        config: Path = CONFIG,
        log_level: str = typer.Option("info"),
        log_format: str = LOG_FORMAT,
    ) -> None:
        """Run the OpenAI-compatible gateway."""
        _logging(log_level, log_format)
        settings = load_settings(
            GatewaySettings,
            config,
            port=port,
            host=host,
            model=model,
            models=_ids(models),
            prefill=prefill or None,
            decode=decode or None,
            scheduler_config=scheduler_config,
            registry=registry,
        )
        from gateway.server import serve

        serve(settings)
