"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with a fitting status."""

from __future__ import annotations

import logging

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.worker: str | None = None  # the worker that failed, for errors that come from one

    @property
    def retryable(self) -> bool:
        """The worker went away before doing anything for this request: another one can serve it."""
        return self.code == "worker_unavailable"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# gRPC status from a worker -> (HTTP status, OpenAI error type, code)
_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (502, "server_error", "kv_not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (502, "server_error", "worker_incompatible"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "server_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "worker_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


def from_grpc(err: grpc.aio.AioRpcError, worker: str) -> APIError:
    status, type_, code = _GRPC_TO_HTTP.get(err.code(), (502, "server_error", "worker_error"))
    param = dict(err.trailing_metadata() or ()).get("kvrelay-param") if status == 400 else None
    details = err.details() or err.code().name
    message = details if status == 400 else f"worker {worker}: {details}"
    e = APIError(status, message, type_, param, code)
    e.worker = worker
    return e


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error serving %s", request.url.path)
    body = APIError(500, "internal error in the gateway; see its log", "server_error", code="internal_error").body()
    return JSONResponse(body, status_code=500)
