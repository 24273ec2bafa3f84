"""Streaming SHA-256 of model files: weights are hundreds of MB, so they are read in 1 MiB chunks,
and a copy is hashed as it is written (one pass over the bytes instead of two)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

CHUNK_BYTES = 1 << 20

Advance = Callable[[int], None]


def _ignore(_: int) -> None:
    return None


def sha256_file(path: Path, advance: Advance = _ignore) -> str:
    """Hex SHA-256 of `path`; `advance` is told how many bytes each chunk held."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def copy_and_hash(src: Path, dst: Path, advance: Advance = _ignore) -> str:
    """`shutil.copy2`, but hashing the bytes as they are written: returns their hex SHA-256."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
            advance(len(chunk))
    shutil.copystat(src, dst)
    return digest.hexdigest()


@contextmanager
def byte_progress(description: str, total: int, enabled: bool) -> Iterator[Advance]:
    """A transient progress bar by bytes on stderr (stdout stays clean for `--json` output)."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
