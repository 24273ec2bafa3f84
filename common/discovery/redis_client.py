"""One way to open Redis: binary-safe, with timeouts, and an error that says what to fix."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import KVRelayError


class RegistryUnavailableError(KVRelayError):
    """The registry's Redis server cannot be reached."""


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else f"{scheme}{sep}***@{host}"


def open_redis(url: str) -> aioredis.Redis:
    """Accepts redis:// and rediss:// (TLS; name the CA with ?ssl_ca_certs=/path) URLs, with a
    password as redis://:password@host:port/db."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"registry URL {redacted(url)!r} must start with redis://, rediss:// or unix://")
    # socket_timeout leaves room for blocking stream reads (at most 1 s each)
    return aioredis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=10)


async def check_redis(client: aioredis.Redis, url: str) -> None:
    try:
        await client.ping()
    except (RedisError, OSError) as e:
        raise RegistryUnavailableError(f"cannot reach the registry at {redacted(url)}: {e}") from e
