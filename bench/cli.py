"""`kvrelay bench ...`: benchmarks are commands, each printing one JSON object last with --json."""

from __future__ import annotations

import json

import typer

bench_app = typer.Typer(no_args_is_help=True, help="benchmarks (each takes --json)")


@bench_app.command("engine")
def engine_cmd(
    model: str = typer.Option(None, help="GGUF file or safetensors directory"),
    concurrency: str = typer.Option("1,8,32,64", help="decode concurrency levels"),
    new_tokens: int = typer.Option(128, help="tokens generated per request"),
    prefill_len: int = typer.Option(512, help="prompt length of the prefill measurement"),
    threads: int = typer.Option(None, help="torch threads (default: all cores)"),
    modes: str = typer.Option("none,fp16,int8", help="weight formats to measure, each in its own process"),
    quality: bool = typer.Option(True, help="top-1 agreement and KL against transformers fp32 on real text"),
    hf: bool = typer.Option(True, help="also time Hugging Face transformers generate on the same weights"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Engine throughput per weight format against the machine's bandwidth bound, RSS, and quality."""
    from bench.engine_bench import run_engine_bench

    result = run_engine_bench(
        model=model,
        concurrency=[int(c) for c in concurrency.split(",")],
        new_tokens=new_tokens,
        prefill_len=prefill_len,
        threads=threads,
        hf=hf,
        modes=modes.split(","),
        quality=quality,
    )
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("transfer")
def transfer_cmd(
    model: str = typer.Option(None, help="GGUF file or safetensors directory"),
    sizes: str = typer.Option("1,16,64", help="MB of KV blocks to move"),
    repeats: int = typer.Option(5, help="pulls per size and backend (median reported)"),
    prompt_len: int = typer.Option(1000, help="prompt whose transfer time is compared with its prefill time"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """KV transfer bandwidth between two processes with each backend, against an in-process copy."""
    from bench.transfer_bench import run_transfer_bench

    result = run_transfer_bench(model, [int(s) for s in sizes.split(",")], repeats, prompt_len)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("serve")
def serve_cmd(
    url: str = typer.Option(None, help="a running gateway (default: start clusters here)"),
    model: str = typer.Option(None, help="GGUF file or safetensors directory, for started clusters"),
    compare: str = typer.Option(
        None,
        help="'colocated': also one colocated worker; 'tracing': traced vs untraced; 'auth': API keys, rate "
        "limits and mTLS on vs off (ABBA)",
    ),
    requests: int = typer.Option(30, help="requests per run"),
    rate: float = typer.Option(0.12, help="mean arrival rate, requests/s (Poisson); 0.12 is sustainable on 2 cores"),
    rates: str = typer.Option(
        None, help="overload mode: comma-separated arrival rates, lowest = unloaded baseline (e.g. 0.12,0.5,1.5)"
    ),
    streams: str = typer.Option(
        None, help="closed-loop mode: comma-separated stream counts (e.g. 8,32): output tokens/s per weight format"
    ),
    formats: str = typer.Option("none,auto", help="with --streams: weight formats to compare (ABBA for two)"),
    per_stream: int = typer.Option(4, help="with --streams: requests each stream sends, one after another"),
    seed: int = typer.Option(0),
    slo_ttft: float = typer.Option(10.0, help="TTFT SLO for goodput, s"),
    slo_tpot: float = typer.Option(0.25, help="TPOT SLO for goodput, s"),
    plot: str = typer.Option("bench-serve.png", help="PNG of the latency distributions ('' for none)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Serving latency (TTFT, TPOT, end to end), throughput and goodput under Poisson load; 429s are
    counted apart. With --rates: the same cluster at an unloaded and overload rates, side by side."""
    from bench.serve_bench import run_rates_bench, run_serve_bench

    if compare not in (None, "colocated", "tracing", "auth"):
        raise typer.BadParameter("use 'colocated', 'tracing' or 'auth'", param_hint="--compare")
    if streams is not None:
        from bench.streams_bench import run_streams_bench

        if url is not None or compare is not None or rates is not None:
            raise typer.BadParameter("--streams starts its own clusters; drop --url, --compare and --rates")
        try:
            counts = [int(s) for s in streams.split(",")]
        except ValueError as e:
            raise typer.BadParameter(f"{streams!r}: use counts like 8,32", param_hint="--streams") from e
        fmts = [f.strip() for f in formats.split(",") if f.strip()]
        if not counts or min(counts) <= 0 or not fmts or set(fmts) - {"auto", "none", "fp16", "int8"}:
            raise typer.BadParameter("positive stream counts, formats among auto,none,fp16,int8")
        result = run_streams_bench(model, counts, fmts, per_stream, seed)
    elif rates is not None:
        if compare is not None:
            raise typer.BadParameter("--rates runs one cluster; drop --compare", param_hint="--rates")
        try:
            levels = [float(r) for r in rates.split(",")]
        except ValueError as e:
            raise typer.BadParameter(f"{rates!r}: use numbers like 0.12,0.5,1.5", param_hint="--rates") from e
        if len(levels) < 2 or min(levels) <= 0:
            raise typer.BadParameter("give at least two positive rates (an unloaded one first)", param_hint="--rates")
        result = run_rates_bench(url, model, levels, requests, seed, slo_ttft, slo_tpot, plot or None)
    else:
        result = run_serve_bench(url, model, compare, requests, rate, seed, slo_ttft, slo_tpot, plot or None)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("prefix")
def prefix_cmd(
    model: str = typer.Option(None, help="GGUF file or safetensors directory"),
    prefill: int = typer.Option(2, help="prefill workers"),
    decode: int = typer.Option(1, help="decode workers"),
    policies: str = typer.Option("round_robin,least_loaded,prefix_load", help="routing policies to compare"),
    requests: int = typer.Option(48, help="requests per policy"),
    rate: float = typer.Option(0.25, help="mean arrival rate, requests/s (Poisson)"),
    prefixes: int = typer.Option(8, help="distinct system prompts"),
    prefix_len: int = typer.Option(1000, help="tokens per system prompt"),
    kv_cache_mb: int = typer.Option(240, help="KV cache per prefill worker (240: ~5 of the 8 prompts; 0: default)"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Prefix-cache hit rate, TTFT and load share per routing policy on a shared-prefix workload."""
    from bench.prefix_bench import run_prefix_bench

    if prefill < 2:
        raise typer.BadParameter("routing needs at least 2 prefill workers", param_hint="--prefill")
    result = run_prefix_bench(
        model, prefill, decode, policies.split(","), requests, rate, prefixes, prefix_len, seed, kv_cache_mb or None
    )
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("scale")
def scale_cmd(
    workers: str = typer.Option("10,100,1000", help="simulated pool sizes (prefill and decode together)"),
    decisions: int = typer.Option(2000, help="routing decisions timed per size"),
    blocks_per_worker: int = typer.Option(2000, help="cached KV blocks in each worker's prefix-index view"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """The gateway's control plane against many simulated workers: decision latency, KV event ingest, discovery."""
    from bench.scale_bench import run_scale_bench

    result = run_scale_bench([int(n) for n in workers.split(",")], decisions, blocks_per_worker)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("chaos")
def chaos_cmd(
    model: str = typer.Option(None, help="GGUF file or safetensors directory (default: SmolLM2-135M-Instruct)"),
    minutes: float = typer.Option(5.0, help="how long traffic runs while workers are killed"),
    kill_every_s: float = typer.Option(30.0, help="SIGKILL a random worker (and restart it) this often"),
    rate: float = typer.Option(0.1, help="mean arrival rate, requests/s (Poisson); 0.1 suits 2 cores"),
    prompts: int = typer.Option(16, help="distinct prompts (each gets a reference answer before the chaos)"),
    long_share: float = typer.Option(0.3, help="share of the prompts that are long completions"),
    long_tokens: int = typer.Option(1000, help="tokens per long prompt (capped by the model's context)"),
    max_tokens: int = typer.Option(48, help="tokens generated per request at most"),
    request_timeout_s: float = typer.Option(300.0, help="a stream not ended after this long counts as failed"),
    settle_s: float = typer.Option(30.0, help="after traffic, how long workers get to free their KV"),
    seed: int = typer.Option(0),
    log_dir: str = typer.Option(None, help="keep every process's log here (default: a temporary directory)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Crash workers under streaming traffic: failures, token mismatches against a reference, KV leaks."""
    from bench.chaos_bench import ChaosConfig, run_chaos_bench

    if minutes <= 0 or kill_every_s <= 0 or rate <= 0:
        raise typer.BadParameter("--minutes, --kill-every-s and --rate must be positive")
    if prompts < 1 or not 0 <= long_share <= 1:
        raise typer.BadParameter("need --prompts >= 1 and 0 <= --long-share <= 1")
    cfg = ChaosConfig(
        model=model,
        minutes=minutes,
        kill_every_s=kill_every_s,
        rate=rate,
        prompts=prompts,
        long_share=long_share,
        long_tokens=long_tokens,
        max_tokens=max_tokens,
        request_timeout_s=request_timeout_s,
        settle_s=settle_s,
        seed=seed,
        log_dir=log_dir,
    )
    result = run_chaos_bench(cfg)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("models")
def models_cmd(
    requests: int = typer.Option(24, help="requests per budget"),
    rate: float = typer.Option(0.2, help="mean arrival rate, requests/s (Poisson)"),
    kv_cache_mb: int = typer.Option(64, help="KV cache of each model on each worker"),
    budget_one_mb: int = typer.Option(450, help="a memory budget that holds one model (fp16 ~335 MB, int8 ~200 MB)"),
    budget_both_mb: int = typer.Option(700, help="a memory budget that holds both"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Two models (SmolLM2 fp16 and int8) behind one gateway under a mixed workload, with a memory budget
    that holds one model at a time and one that holds both: loads, evictions, cold-load time, TTFT per model."""
    from bench.models_bench import run_models_bench

    budgets = {"one": budget_one_mb, "both": budget_both_mb}
    result = run_models_bench(requests, rate, seed, kv_cache_mb, budgets)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("canary")
def canary_cmd(
    canary_weight: int = typer.Option(10, min=1, max=99, help="percent of users on the canary"),
    clients: int = typer.Option(6, min=1, help="clients sending short requests back to back"),
    healthy_s: float = typer.Option(60.0, help="seconds of traffic before the canary's worker is killed"),
    after_s: float = typer.Option(10.0, help="seconds of traffic after the rollback"),
    timeout_s: float = typer.Option(120.0, help="give up waiting for the rollback after this long"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Time from a canary breaking (its worker killed) to the judge's rollback, at the judge's default settings."""
    from bench.canary_bench import run_canary_bench

    result = run_canary_bench(canary_weight, clients, healthy_s, after_s, timeout_s)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))
