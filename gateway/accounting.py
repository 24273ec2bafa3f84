"""Counts every HTTP request by route and status, and the generation requests still being served
(a streamed body included, to its last byte), which the shutdown sequence waits for."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.lifecycle import Lifecycle
from gateway.metrics import HTTP_REQUESTS

_GENERATION_PREFIX = "/v1/"


class RequestAccounting:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app fails before answering

        async def send_seeing_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        generation = scope["method"] == "POST" and scope["path"].startswith(_GENERATION_PREFIX)
        self.lifecycle.active += generation
        try:
            await self.app(scope, receive, send_seeing_status)
        finally:
            self.lifecycle.active -= generation
            route = scope.get("route")
            HTTP_REQUESTS.labels(getattr(route, "path", "unmatched"), str(status)).inc()
