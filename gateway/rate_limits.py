"""Per-key rate limits: a token bucket per key for requests per minute and one for tokens per
minute. A request takes one request token when it arrives, and reserves prompt + max_tokens
tokens once its prompt is known; when it ends, what it did not use goes back (`refund`).

With a registry, the buckets live in Redis and every gateway replica draws from the same ones: one
Lua script reads, refills and takes atomically, on the Redis server's clock. Without one, they are
in this process's memory. If Redis cannot be reached, limits are not enforced (requests pass, a
warning says so every 10 s): an outage of the shared store must not become an outage of the API,
and the keys themselves are still checked (from the keys last read).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
_WARN_EVERY_S = 10.0


@dataclass(frozen=True)
class Take:
    ok: bool
    limit: int
    remaining: int
    retry_after_s: float  # until enough tokens are back (0 when ok)
    reset_s: float  # until the bucket is full again


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: "1s", "6m0s", "1h2m3s"."""
    s = max(0, math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    return f"{m}m{sec}s" if m else f"{sec}s"


class MemoryBuckets:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill, monotonic)

    async def take(self, name: str, per_minute: int, n: int) -> Take:
        rate = per_minute / 60.0
        now = time.monotonic()
        tokens, last = self._buckets.get(name, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if n > per_minute:  # can never fit: refuse for good rather than forever "retry later"
            return Take(False, per_minute, int(tokens), 60.0, (per_minute - tokens) / rate)
        ok = tokens >= n
        if ok:
            tokens -= n
        self._buckets[name] = (tokens, now)
        wait = 0.0 if ok else (n - tokens) / rate
        return Take(ok, per_minute, int(tokens), wait, (per_minute - tokens) / rate)

    async def refund(self, name: str, per_minute: int, n: int) -> None:
        if name in self._buckets and n > 0:
            tokens, last = self._buckets[name]
            self._buckets[name] = (min(float(per_minute), tokens + n), last)


# KEYS[1]: the bucket; ARGV: capacity, n (negative: a refund). Returns {ok, tokens*1000}.
_TAKE = """
local cap = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate = cap / 60.0
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * rate)
local ok = 0
if n < 0 then
  tokens = math.min(cap, tokens - n)
  ok = 1
elseif tokens >= n then
  tokens = tokens - n
  ok = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], 120)
return {ok, math.floor(tokens * 1000)}
"""


class RedisBuckets:
    def __init__(self, client: aioredis.Redis, prefix: str = "kvrelay") -> None:
        self._script = client.register_script(_TAKE)
        self.prefix = prefix
        self._warned = 0.0

    async def _run(self, name: str, per_minute: int, n: int) -> tuple[bool, float]:
        try:
            ok, milli = await self._script(keys=[f"{self.prefix}:ratelimit:{name}"], args=[per_minute, n])
        except (RedisError, OSError) as e:
            if time.monotonic() - self._warned > _WARN_EVERY_S:
                self._warned = time.monotonic()
                log.warning("rate limits are not enforced while Redis is unreachable: %s", e)
            return True, float(per_minute)
        return bool(ok), milli / 1000.0

    async def take(self, name: str, per_minute: int, n: int) -> Take:
        rate = per_minute / 60.0
        if n > per_minute:
            return Take(False, per_minute, 0, 60.0, 60.0)
        ok, tokens = await self._run(name, per_minute, n)
        wait = 0.0 if ok else (n - tokens) / rate
        return Take(ok, per_minute, int(tokens), wait, (per_minute - tokens) / rate)

    async def refund(self, name: str, per_minute: int, n: int) -> None:
        if n > 0:
            await self._run(name, per_minute, -n)


def headers(requests: Take | None, tokens: Take | None) -> dict[str, str]:
    """The x-ratelimit-* headers OpenAI sends, for whichever limits apply."""
    out: dict[str, str] = {}
    for kind, take in (("requests", requests), ("tokens", tokens)):
        if take is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(take.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, take.remaining))
            out[f"x-ratelimit-reset-{kind}"] = reset_text(take.reset_s)
    return out
