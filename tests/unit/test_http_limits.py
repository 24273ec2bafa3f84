"""A client that reads nothing has its response abandoned after the write timeout."""

from __future__ import annotations

import asyncio

from gateway.http_limits import WriteTimeoutMiddleware


def test_a_response_nobody_reads_is_abandoned():
    sent: list[dict] = []
    finished = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(1000):
                await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True, "i": i})
        finally:
            finished.append(True)  # the stream's cleanup ran: its worker call would be cancelled here

    async def stuck_after_two(message: dict) -> None:
        sent.append(message)
        if len(sent) > 2:
            await asyncio.sleep(3600)  # the client's window is full and it never reads

    async def run() -> None:
        mw = WriteTimeoutMiddleware(app, write_timeout_s=0.2)
        await asyncio.wait_for(mw({"type": "http", "path": "/v1/x"}, None, stuck_after_two), 5)

    asyncio.run(run())
    assert len(sent) == 3 and finished == [True]
