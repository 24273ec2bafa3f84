"""One server interceptor for every method: it continues the caller's trace in a SERVER span and
maps kvrelay's errors to gRPC status codes (recorded on the span)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from common.errors import (
    CacheFullError,
    InvalidRequestError,
    KVRelayError,
    KVTransferError,
    ModelLoadError,
    PermissionDeniedError,
    UnknownRequestError,
)
from common.kv.layout import KVLayoutMismatchError
from common.tracing.grpc_context import mark_error, server_span

log = logging.getLogger(__name__)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (KVLayoutMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownRequestError, grpc.StatusCode.NOT_FOUND),
    (CacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KVTransferError, grpc.StatusCode.ABORTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (KVRelayError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in a gRPC handler")
    message = str(exc) or type(exc).__name__
    mark_error(code, message)
    param = getattr(exc, "param", None)
    if param:
        context.set_trailing_metadata((("kvrelay-param", param),))
    await context.abort(code, message)


@contextlib.asynccontextmanager
async def _serving(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """One call: inside the caller's trace, with any kvrelay error turned into its status code."""
    with server_span(method, context):
        try:
            yield
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort(context, e)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _serving(method, context):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with _serving(method, context):
                    async for item in inner_us(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
