"""Connection-level limits the HTTP server does not enforce by itself.

- Header timeout: a client must send a complete request head within `header_timeout_s` of
  connecting (or of the previous response, on a kept-alive connection); slow-header clients
  (slowloris) would otherwise hold connections forever.
- Write timeout: a client that stops reading its response blocks the server's writes once the
  socket buffers fill; after `write_timeout_s` of that, the response is abandoned (so the worker
  aborts the request and frees its KV) and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    class HeaderTimeoutProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _armed_for: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._armed_for = self.cycle  # a new request replaces the cycle: the head has arrived
            self._timer = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            if self.cycle is self._armed_for and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in %.0fs", header_timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


class WriteTimeoutError(Exception):
    """The client read nothing of its response for write_timeout_s."""


class WriteTimeoutMiddleware:
    def __init__(self, app: ASGIApp, write_timeout_s: float) -> None:
        self.app = app
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_or_give_up(message: Message) -> None:
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    await send(message)
            except TimeoutError:
                raise WriteTimeoutError from None

        try:
            await self.app(scope, receive, send_or_give_up)
        except WriteTimeoutError:
            log.warning("client of %s read nothing for %.0fs; response abandoned", scope["path"], self.write_timeout_s)
