"""`kvrelay bench ...`: benchmarks are commands, each printing one JSON object last with --json."""

from __future__ import annotations

import json

import typer

bench_app = typer.Typer(no_args_is_help=True, help="benchmarks (each takes --json)")


@bench_app.command("engine")
def engine_cmd(
    model: str = typer.Option(None, help="GGUF file or safetensors directory"),
    concurrency: str = typer.Option("1,8,32", help="decode concurrency levels"),
    new_tokens: int = typer.Option(128, help="tokens generated per request"),
    prefill_len: int = typer.Option(512, help="prompt length of the prefill measurement"),
    threads: int = typer.Option(None, help="torch threads (default: all cores)"),
    hf: bool = typer.Option(True, help="also time Hugging Face transformers generate on the same weights"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Engine throughput: decode tokens/s at several concurrencies, prefill tokens/s, HF baseline."""
    from bench.engine_bench import run_engine_bench

    result = run_engine_bench(
        model=model,
        concurrency=[int(c) for c in concurrency.split(",")],
        new_tokens=new_tokens,
        prefill_len=prefill_len,
        threads=threads,
        hf=hf,
    )
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(json.dumps(result, indent=2))
