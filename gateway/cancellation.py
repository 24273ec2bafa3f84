"""Stopping background loops for sure.

grpc.aio and redis-py can swallow a task's cancellation: grpc.aio turns it into an RpcError with
CANCELLED, and redis-py (seen with 8.x on a blocking XREAD) can drop it and return from the
command, so the loop around the call carries on as if nothing happened. Loops therefore re-check
after their calls (`reraise_if_cancelling`) and also own an exit condition of their own; whoever
stops them cancels again until they end (`cancel_and_wait`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

_RECANCEL_S = 0.1


def reraise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Iterable[asyncio.Task], timeout: float) -> set[asyncio.Task]:
    """Cancel the tasks, repeating the cancellation until each has ended or `timeout` passed.
    Returns those still running (the caller decides whether that is worth a warning)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, left))
    return pending
