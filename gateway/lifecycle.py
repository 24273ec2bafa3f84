"""The gateway's shutdown, in the order a load balancer needs it.

On SIGTERM: /ready answers 503 at once (so the balancer stops sending); requests that still
arrive during `drain_notice_s` are served; then new requests get 503 while running ones finish,
for at most `shutdown_timeout_s`; then the server stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.errors import APIError

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, drain_notice_s: float, shutdown_timeout_s: float) -> None:
        self.drain_notice_s = drain_notice_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.draining = False  # /ready says 503
        self.accepting = True  # new generation requests are taken
        self.active = 0  # generation requests being served (streams included)

    def check_accepting(self) -> None:
        if not self.accepting:
            raise APIError(
                503,
                "the gateway is shutting down; retry on another replica",
                "server_error",
                code="shutting_down",
                retry_after=1.0,
            )

    async def drain(self) -> None:
        """Run the shutdown sequence; returns when the server may stop."""
        self.draining = True
        log.info("draining: /ready answers 503; serving for %.1fs more, then finishing what runs", self.drain_notice_s)
        await asyncio.sleep(self.drain_notice_s)
        self.accepting = False
        deadline = time.monotonic() + self.shutdown_timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active:
            log.warning("%d requests still running after %.0fs; stopping anyway", self.active, self.shutdown_timeout_s)
        else:
            log.info("drained: no request running")
