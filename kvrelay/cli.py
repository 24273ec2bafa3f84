"""The `kvrelay` command."""

from __future__ import annotations

import asyncio
import logging
import uuid

import typer

from bench.cli import bench_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="kvrelay: disaggregated prefill/decode LLM serving")
app.add_typer(bench_app, name="bench")


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
