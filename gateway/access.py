"""Who is asking: `Authorization: Bearer <key>` on every /v1/ request, checked before the body is
read (so before any tokenizing or worker call), then the key's requests-per-minute budget.

- No key, or a wrong or revoked one: 401 in OpenAI's shape (code `invalid_api_key`) with
  `WWW-Authenticate: Bearer`; one message for all three, so the answer reveals nothing.
- Over the key's requests/min: 429 `rate_limit_exceeded` with `Retry-After` and OpenAI's
  `x-ratelimit-*` headers.
- Accepted: the key's record is in `request.state.api_key` for what comes later (its models,
  its tokens/min reservation, its cache salt; see `Authorizer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api_keys import ApiKey, KeyStore
from gateway.errors import APIError
from gateway.rate_limits import MemoryBuckets, RedisBuckets, Take, headers

log = logging.getLogger(__name__)
_PROTECTED = "/v1/"


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


async def _answer(send: Send, status: int, error: APIError, extra: dict[str, str]) -> None:
    body = json.dumps(error.body()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in {**error.headers(), **extra}.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore, buckets: MemoryBuckets | RedisBuckets) -> None:
        self.app = app
        self.keys = keys
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_PROTECTED):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        token = _bearer(scope)
        key = self.keys.verify(token) if token else None
        if key is None:
            message = "a valid API key is required: send `Authorization: Bearer <key>`"
            error = APIError(401, message, "invalid_request_error", code="invalid_api_key")
            _fail(state, error)
            await _answer(send, 401, error, {"WWW-Authenticate": "Bearer"})
            return
        state["api_key"] = key
        if key.rpm:
            take = await self.buckets.take(f"{key.id}:rpm", key.rpm, 1)
            state["ratelimit"] = {"requests": take}
            if not take.ok:
                message = f"rate limit reached for requests: {key.rpm} per minute on key {key.id}"
                error = APIError(429, message, "requests", code="rate_limit_exceeded", retry_after=take.retry_after_s)
                _fail(state, error)
                await _answer(send, 429, error, headers(take, None))
                return
        await self.app(scope, receive, send)


def _fail(state: dict, error: APIError) -> None:
    record = state.get("record")
    if record is not None:
        record.fail(error.status, error.code, error.message)


class Authorizer:
    """What a key may do once its request is parsed: the models it may use, its tokens/min
    reservation (given back at the end as far as unused), and the prefix-cache salt of its tenant."""

    def __init__(self, buckets: MemoryBuckets | RedisBuckets, cache_salt_per_key: bool) -> None:
        self.buckets = buckets
        self.cache_salt_per_key = cache_salt_per_key
        self._refunds: set[asyncio.Task] = set()

    @staticmethod
    def key_of(request: Request) -> ApiKey | None:
        return getattr(request.state, "api_key", None)

    def check_model(self, request: Request, model: str) -> None:
        key = self.key_of(request)
        if key is not None and not key.allows(model):
            raise APIError(
                404,
                f"the model {model!r} does not exist or this key has no access to it",
                param="model",
                code="model_not_found",
            )

    def cache_salt(self, request: Request, requested: str) -> str:
        key = self.key_of(request)
        if key is None or not self.cache_salt_per_key:
            return requested
        return f"{key.cache_salt}/{requested}" if requested else key.cache_salt

    async def reserve(self, request: Request, tokens: int, on_end: Callable[[Callable[[int], None]], None]) -> None:
        """Take `tokens` from the key's tokens/min budget (429 if it has not that many), and arrange
        for the unused part to come back: `on_end` registers a callback the request calls with the
        tokens it actually used."""
        key = self.key_of(request)
        if key is None or not key.tpm:
            return
        take = await self.buckets.take(f"{key.id}:tpm", key.tpm, tokens)
        limits = getattr(request.state, "ratelimit", {})
        limits["tokens"] = take
        request.state.ratelimit = limits
        if not take.ok:
            raise RateLimited(key, tokens, take, limits.get("requests"))

        def settle(used: int) -> None:
            unused = tokens - min(tokens, max(0, used))
            if unused:
                task = asyncio.get_running_loop().create_task(self.buckets.refund(f"{key.id}:tpm", key.tpm, unused))
                self._refunds.add(task)
                task.add_done_callback(self._refunds.discard)

        on_end(settle)


class RateLimited(APIError):
    def __init__(self, key: ApiKey, tokens: int, take: Take, requests: Take | None) -> None:
        never = tokens > take.limit
        message = (
            f"this request needs {tokens} tokens (prompt + max_tokens), more than key {key.id}'s limit of "
            f"{take.limit} per minute; lower max_tokens"
            if never
            else f"rate limit reached for tokens: {take.limit} per minute on key {key.id}"
        )
        super().__init__(429, message, "tokens", code="rate_limit_exceeded", retry_after=take.retry_after_s)
        self.extra = headers(requests, take)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.extra}


def response_headers(request: Request) -> dict[str, str]:
    """The x-ratelimit-* headers of an accepted request (empty when its key has no limits)."""
    limits = getattr(request.state, "ratelimit", {})
    return headers(limits.get("requests"), limits.get("tokens"))


def replace_salt(params, salt: str):  # noqa: ANN001, ANN201
    return dataclasses.replace(params, cache_salt=salt)
