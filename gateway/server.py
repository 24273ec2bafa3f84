"""`kvrelay gateway`: serve the app with uvicorn, with kvrelay's shutdown sequence on SIGTERM and
SIGINT (see gateway.lifecycle) instead of uvicorn's immediate close; a second signal forces it."""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn

from common.settings import GatewaySettings
from gateway.app import create_app
from gateway.http_limits import header_timeout_protocol
from gateway.lifecycle import Lifecycle


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # noqa: ANN001
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded as a captured signal: uvicorn would re-raise it after shutdown, and the process
        # would die of SIGTERM instead of exiting 0 after a clean drain.
        if self._drain is not None or self._loop is None:
            self.should_exit, self.force_exit = True, self._drain is not None
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.lifecycle.drain()
        self.should_exit = True


class _InternalServer(uvicorn.Server):
    """The internal port's server: it stops when the public one does, and leaves signals to it."""

    def capture_signals(self):  # noqa: ANN201
        return contextlib.nullcontext()


async def _serve(public: _DrainingServer, internal: uvicorn.Server | None) -> None:
    task = asyncio.get_running_loop().create_task(internal.serve()) if internal else None
    try:
        await public.serve()
    finally:
        if task is not None:
            internal.should_exit = True  # type: ignore[union-attr]
            await task


def serve(settings: GatewaySettings) -> None:
    app = create_app(settings)
    lifecycle: Lifecycle = app.state.lifecycle
    internal = None
    if settings.internal_port is not None:
        internal = _InternalServer(
            uvicorn.Config(
                app.state.internal_app,
                host=settings.internal_host,
                port=settings.internal_port,
                log_level="warning",
                log_config=None,  # uvicorn's lines go through kvrelay's handler (JSON lines or text)
                access_log=False,
                lifespan="off",
            )
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=5,
        ssl_certfile=settings.https_cert_file,
        ssl_keyfile=settings.https_key_file,
    )
    public = _DrainingServer(config, lifecycle)
    asyncio.run(_serve(public, internal))
