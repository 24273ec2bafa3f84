"""grpc.aio (and at times redis-py) turn a task's cancellation into their own error (an RpcError
with CANCELLED, a ConnectionError). A retry loop that catches those would then never end when
its task is cancelled, and shutdown would hang; such loops call this in their error path."""

from __future__ import annotations

import asyncio


def reraise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
