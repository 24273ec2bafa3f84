"""`kvrelay keys add|ls|revoke`: manage the gateway's API keys (stored as salted digests only)."""

from __future__ import annotations

import json
from datetime import datetime

import typer

from common.settings import read_secret
from gateway.api_keys import KeyStore

keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (a key is shown once, when it is made)")
FILE = typer.Option(
    None, "--file", envvar="KVRELAY_AUTH__KEYS_FILE", help="keys file (default ~/.config/kvrelay/keys.json)"
)
REGISTRY = typer.Option(
    None, "--registry", envvar="KVRELAY_REGISTRY", help="redis:// URL: keys shared by every gateway"
)
PREFIX = typer.Option("kvrelay", "--registry-prefix", envvar="KVRELAY_REGISTRY_PREFIX")
SECRET = typer.Option(
    None,
    "--secret-file",
    envvar="KVRELAY_SHARED_SECRET_FILE",
    help="the deployment's shared secret (signs keys in Redis)",
)


def _store(file: str | None, registry: str | None, prefix: str, secret_file: str | None = None) -> KeyStore:
    return KeyStore(file, registry, prefix, read_secret(secret_file))


@keys_app.command("add")
def add(
    name: str = typer.Argument(..., help="who the key is for"),
    models: str = typer.Option(None, help="comma-separated models it may use (default: all)"),
    rpm: int = typer.Option(None, min=1, help="requests per minute"),
    tpm: int = typer.Option(None, min=1, help="tokens per minute (prompt + max_tokens)"),
    workload_class: str = typer.Option(
        None, "--class", help="the gateway workload class all its requests run in (e.g. batch)"
    ),
    file: str = FILE,
    registry: str = REGISTRY,
    prefix: str = PREFIX,
    secret_file: str = SECRET,
) -> None:
    """Make a key and print it. It is not stored, only its digest: copy it now."""
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        key, rec = _store(file, registry, prefix, secret_file).add(name, allowed, rpm, tpm, workload_class)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(key)
    typer.echo(f"id {rec.id} for {name!r}; this is the only time the key is shown", err=True)


@keys_app.command("ls")
def ls(
    file: str = FILE,
    registry: str = REGISTRY,
    prefix: str = PREFIX,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The keys: id, name, created, state, models, limits (never the key or its digest)."""
    keys = sorted(_store(file, registry, prefix).load().values(), key=lambda k: k.created)
    if as_json:
        for k in keys:
            typer.echo(json.dumps(k.public()))
        return
    typer.echo(f"{'ID':10}  {'NAME':20}  {'CREATED':19}  {'STATE':7}  {'RPM':>6}  {'TPM':>8}  MODELS")
    for k in keys:
        when = datetime.fromtimestamp(k.created).strftime("%Y-%m-%d %H:%M:%S")
        state = "revoked" if k.revoked else "active"
        typer.echo(
            f"{k.id:10}  {k.name[:20]:20}  {when:19}  {state:7}  {k.rpm or '-':>6}  {k.tpm or '-':>8}  "
            f"{','.join(k.models) or 'all'}"
        )


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., metavar="ID_OR_NAME"),
    file: str = FILE,
    registry: str = REGISTRY,
    prefix: str = PREFIX,
    secret_file: str = SECRET,
) -> None:
    """Revoke a key; gateways refuse it within their reload interval (2 s by default)."""
    try:
        rec = _store(file, registry, prefix, secret_file).revoke(key_id)
    except KeyError as e:
        typer.echo(f"error: {e.args[0]}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"revoked {rec.id} ({rec.name})")
