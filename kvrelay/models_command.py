"""`kvrelay models add|ls|show|rm|verify`: the model repository, where models are served from by id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from common.errors import KVRelayError
from common.repository import ModelEntry, ModelRepository, parse_spec

models_app = typer.Typer(no_args_is_help=True, help="Manage the model repository (models by id and version)")
REPO = typer.Option(
    None,
    "--repo",
    envvar="KVRELAY_MODEL_REPO",
    help="repository root (default $XDG_DATA_HOME/kvrelay/models, i.e. ~/.local/share/kvrelay/models)",
)
SPEC = typer.Argument(..., metavar="ID[@VERSION]", help="a model id; without a version, its newest")


@contextmanager
def _user_errors() -> Iterator[None]:
    """What the user can fix (a bad id, an unwritable --repo) is said on stderr with exit status 2;
    1 is kept for a failed verification."""
    try:
        yield
    except (KVRelayError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


def _summary(e: ModelEntry) -> dict[str, object]:
    return {**e.metadata.model_dump(mode="json"), "path": str(e.path), "weights_path": str(e.weights_path)}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@models_app.command("add")
def add(
    path: str = typer.Argument(..., help="a .gguf file, or a directory with config.json and *.safetensors"),
    model_id: str = typer.Option(
        ..., "--id", help="the id to serve it as: lowercase letters, digits, ., _ and -, at most 64"
    ),
    version: str = typer.Option(None, "--version", help="default: 1, or one past the highest numeric version"),
    quantization: str = typer.Option(
        None,
        "--serve-quantization",
        help="how workers serve it unless their own settings say otherwise: none, fp16 or int8",
    ),
    repo: str = REPO,
) -> None:
    """Store a model (hard-linked when possible, else copied) with the SHA-256 of every file."""
    if quantization not in (None, "none", "fp16", "int8"):
        raise typer.BadParameter("use none, fp16 or int8", param_hint="--serve-quantization")
    with _user_errors():
        entry = ModelRepository(repo).add(path, model_id, version, serve_quantization=quantization)
    m = entry.metadata
    typer.echo(
        f"added {entry.spec}: {m.format} {m.architecture}, {m.parameter_count:,} parameters, "
        f"{m.quantization}, {_size(m.size_bytes)} in {entry.path}"
    )


@models_app.command("ls")
def ls(repo: str = REPO, as_json: bool = typer.Option(False, "--json", help="one JSON object per line")) -> None:
    """Every stored version, oldest first within an id."""
    with _user_errors():
        entries = ModelRepository(repo).list()
    if as_json:
        for e in entries:
            typer.echo(json.dumps(_summary(e)))
        return
    row = "{:24}  {:10}  {:11}  {:10}  {:>13}  {:6}  {:>9}  {}".format
    typer.echo(row("ID", "VERSION", "FORMAT", "ARCH", "PARAMS", "QUANT", "SIZE", "ADDED (UTC)"))
    for e in entries:
        m = e.metadata
        params, size, added = f"{m.parameter_count:,}", _size(m.size_bytes), f"{m.added_at:%Y-%m-%d %H:%M:%S}"
        typer.echo(row(m.id, m.version, m.format, m.architecture, params, m.quantization, size, added))


@models_app.command("show")
def show(spec: str = SPEC, repo: str = REPO, as_json: bool = typer.Option(False, "--json")) -> None:
    """One version's metadata, files and digests."""
    with _user_errors():
        entry = ModelRepository(repo).get(*parse_spec(spec))
    if as_json:
        typer.echo(json.dumps(_summary(entry)))
        return
    m = entry.metadata
    for label, value in (
        ("model", entry.spec),
        ("format", m.format),
        ("architecture", m.architecture),
        ("parameters", f"{m.parameter_count:,}"),
        ("quantization", m.quantization),
        ("size", f"{_size(m.size_bytes)} ({m.size_bytes:,} bytes)"),
        ("added", m.added_at.isoformat()),
        ("path", str(entry.weights_path)),
    ):
        typer.echo(f"{label:13} {value}")
    typer.echo("files (sha256):")
    for name, digest in m.sha256.items():
        typer.echo(f"  {digest}  {name}")


@models_app.command("rm")
def rm(spec: str = SPEC, repo: str = REPO, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")) -> None:
    """Remove one version, or every version of an id when none is given."""
    store = ModelRepository(repo)
    with _user_errors():
        model_id, version = parse_spec(spec)
        store.get(model_id, version)  # raises, naming what there is
    if not yes:
        doomed = [e.spec for e in store.list() if e.metadata.id == model_id and version in (None, e.metadata.version)]
        typer.confirm(f"remove {', '.join(doomed)}?", abort=True)
    with _user_errors():
        gone = store.remove(model_id, version)
    for e in gone:
        typer.echo(f"removed {e.spec}")


@models_app.command("verify")
def verify(
    spec: str = typer.Argument(None, metavar="[ID[@VERSION]]", help="default: every stored version"),
    repo: str = REPO,
) -> None:
    """Re-hash stored files against their recorded SHA-256; exit status 1 when any differs."""
    store = ModelRepository(repo)
    with _user_errors():
        entries = [store.get(*parse_spec(spec))] if spec else store.list()
    failed = False
    for entry in entries:
        mismatches = store.verify(entry, progress=True)
        failed = failed or bool(mismatches)
        for m in mismatches:
            typer.echo(f"MISMATCH {entry.spec} {m}")
        if not mismatches:
            typer.echo(f"ok {entry.spec} ({len(entry.metadata.sha256)} files)")
    raise typer.Exit(1 if failed else 0)
