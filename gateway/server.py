"""`kvrelay gateway`: serve the app with uvicorn."""

from __future__ import annotations

import uvicorn

from common.settings import GatewaySettings
from gateway.app import create_app


def serve(settings: GatewaySettings) -> None:
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)
