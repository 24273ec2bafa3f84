"""Work for a client that has gone away stops: the gateway races each wait on the workers (the
first token; the whole answer of a non-streaming request) against the client's disconnect, and
cancels the work when the client wins. Cancelling it cancels the gRPC call, so the worker aborts
the request and frees its KV at once. (A streaming response is cancelled by Starlette itself when
the client disconnects mid-stream.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGoneError(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(work: Awaitable[T], request: Request) -> T:
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, gone):
            if not task.done():
                task.cancel()
    if job.done() and not job.cancelled():
        return job.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await job  # let the cancelled work run its cleanup before the handler returns
    raise ClientGoneError
