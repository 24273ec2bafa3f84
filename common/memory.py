"""Giving freed memory back to the OS, so that a process's resident memory follows what it uses."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys


def release_freed_memory() -> None:
    """Collect what was just dropped (a parsed model file, a loaded model's scratch, an evicted
    model) and return the freed heap to the OS: CPython and glibc keep freed small objects in
    their arenas, which would otherwise stay resident under whatever is allocated next."""
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
