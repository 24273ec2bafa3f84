"""Waiting on a condition instead of sleeping a fixed time: a test proceeds as soon as what it
waits for holds, and a timeout names what never happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_for(check: Callable[[], object], timeout: float = 10.0, what: str = "condition", every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


async def async_wait_for(
    check: Callable[[], Awaitable[object]], timeout: float = 10.0, what: str = "condition", every: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)
