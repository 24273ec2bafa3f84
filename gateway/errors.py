"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with a fitting status."""

from __future__ import annotations

import logging

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429 and 503)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


class WorkerFailure(APIError):
    """A worker failed one attempt at a request: it died, stalled, refused or errored. Another worker
    may well serve the request; whether to try is the supervisor's decision (`recoverable`)."""

    def __init__(self, status: int, message: str, worker: str, stage: str, code: str, type_: str = "server_error"):
        super().__init__(status, message, type_, None, code)
        self.worker = worker
        self.stage = stage  # "prefill" | "decode"

    @property
    def recoverable(self) -> bool:
        """False only when the request itself is at fault (another worker would refuse it too)."""
        return self.status != 400


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
    grpc.StatusCode.ABORTED: (502, "server_error", "kv_transfer_failed"),
    grpc.StatusCode.PERMISSION_DENIED: (502, "server_error", "kv_handle_refused"),
}


def from_grpc(err: grpc.aio.AioRpcError, worker: str, stage: str) -> WorkerFailure:
    status, type_, code = _GRPC_TO_HTTP.get(err.code(), (502, "server_error", "worker_error"))
    details = err.details() or err.code().name
    message = details if status == 400 else f"{stage} worker {worker}: {details}"
    e = WorkerFailure(status, message, worker, stage, code or "invalid_request", type_)
    if status == 400:
        e.code = None
        e.param = dict(err.trailing_metadata() or ()).get("kvrelay-param")
    return e


def _record_failure(request: Request, status: int, code: str | None, message: str) -> None:
    record = getattr(request.state, "record", None)  # set on generation requests (gateway/observer.py)
    if record is not None:
        record.fail(status, code, message)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    _record_failure(request, exc.status, exc.code or exc.type, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape too."""
    message = {404: f"no route {request.url.path!r}", 405: f"{request.method} is not allowed on {request.url.path!r}"}
    body = APIError(
        exc.status_code,
        message.get(exc.status_code, str(exc.detail)),
        "invalid_request_error",
        code=_HTTP_CODES.get(exc.status_code),
    ).body()
    _record_failure(request, exc.status_code, body["error"]["code"] or body["error"]["type"], body["error"]["message"])
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error serving %s", request.url.path)
    body = APIError(500, "internal error in the gateway; see its log", "server_error", code="internal_error").body()
    _record_failure(request, 500, "internal_error", type(exc).__name__)
    return JSONResponse(body, status_code=500)
