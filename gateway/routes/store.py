"""Where routes live: a file (one gateway) or a Redis hash shared by every gateway replica.

Two kinds of write. An operator's `set` replaces the route, bumps its revision and clears any
rollback record. The judge's `apply` is compare-and-set on the revision it judged: when two replicas
roll back the same canary only the first write lands, and neither overwrites an operator's newer set.
In Redis the check and the write are one WATCH/MULTI transaction. With the deployment's shared
secret, records are signed (HMAC-SHA256) and gateways ignore records that do not verify, so write
access to Redis alone cannot steer traffic to another model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import redis
import yaml
from pydantic import ValidationError

from common.atomic_file import write_atomically
from gateway.routes.spec import RouteSpec

log = logging.getLogger(__name__)
Clock = Callable[[], float]


class RouteStore(Protocol):
    def get(self, name: str) -> RouteSpec | None: ...

    def all(self) -> dict[str, RouteSpec]: ...

    def set(self, spec: RouteSpec) -> RouteSpec:
        """An operator's write: the stored route (revision + 1, no rollback record)."""
        ...

    def apply(self, spec: RouteSpec, expected_revision: int) -> bool:
        """The judge's write; False (and nothing written) unless the stored revision is expected."""
        ...

    def remove(self, name: str) -> bool: ...


def _operator_write(spec: RouteSpec, current_revision: int, now: float) -> RouteSpec:
    return RouteSpec.model_validate(
        {**spec.model_dump(), "revision": current_revision + 1, "rolled_back": None, "changed_at": now}
    )


def _judge_write(spec: RouteSpec, expected_revision: int) -> RouteSpec:
    return RouteSpec.model_validate({**spec.model_dump(), "revision": expected_revision + 1})


class MemoryRouteStore:
    """Routes in memory, optionally backed by a JSON or YAML file (`routes:` list, or a bare list)
    that is re-read when it changes and rewritten on every write."""

    def __init__(self, routes: Iterable[RouteSpec] = (), path: str | Path | None = None, clock: Clock = time.time):
        self.path = Path(path) if path is not None else None
        self._clock = clock
        self._routes = {r.name: r for r in routes}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, clock: Clock = time.time) -> MemoryRouteStore:
        store = cls(path=path, clock=clock)
        store._reload()
        return store

    def get(self, name: str) -> RouteSpec | None:
        return self.all().get(name)

    def all(self) -> dict[str, RouteSpec]:
        with self._lock:
            self._reload()
            return dict(self._routes)

    def set(self, spec: RouteSpec) -> RouteSpec:
        with self._lock:
            self._reload()
            current = self._routes.get(spec.name)
            new = _operator_write(spec, current.revision if current else 0, self._clock())
            self._routes[spec.name] = new
            self._save()
            return new

    def apply(self, spec: RouteSpec, expected_revision: int) -> bool:
        with self._lock:
            self._reload()
            current = self._routes.get(spec.name)
            if current is None or current.revision != expected_revision:
                return False
            self._routes[spec.name] = _judge_write(spec, expected_revision)
            self._save()
            return True

    def remove(self, name: str) -> bool:
        with self._lock:
            self._reload()
            if self._routes.pop(name, None) is None:
                return False
            self._save()
            return True

    def _reload(self) -> None:
        if self.path is None or not self.path.exists():
            return
        st = self.path.stat()
        if self._seen == (st.st_mtime_ns, st.st_size):
            return
        self._routes = _parse_file(self.path)
        self._seen = (st.st_mtime_ns, st.st_size)

    def _save(self) -> None:
        if self.path is None:
            return
        routes = [r.model_dump(mode="json") for r in self._routes.values()]
        if self.path.suffix == ".json":
            body = json.dumps({"routes": routes}, indent=1)
        else:
            body = yaml.safe_dump({"routes": routes}, sort_keys=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, body)
        st = self.path.stat()
        self._seen = (st.st_mtime_ns, st.st_size)


def _parse_file(path: Path) -> dict[str, RouteSpec]:
    try:
        data = yaml.safe_load(path.read_text()) or []  # YAML reads JSON too
    except yaml.YAMLError as e:
        raise ValueError(f"routes file {path} is not valid JSON or YAML: {e}") from e
    items = data.get("routes", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"routes file {path} should hold a list of routes (or `routes:` with one)")
    routes: dict[str, RouteSpec] = {}
    for i, item in enumerate(items):
        try:
            spec = RouteSpec.model_validate(item)
        except ValidationError as e:
            raise ValueError(f"route #{i} in {path}: {e}") from e
        if spec.name in routes:
            raise ValueError(f"routes file {path} names route {spec.name!r} twice")
        routes[spec.name] = spec
    return routes


class RedisRouteStore:
    """Routes in the hash `{prefix}:routes`: field = route name, value = `{"route": ..., "signature": ...}`."""

    def __init__(
        self, client: redis.Redis, prefix: str = "kvrelay", secret: bytes | None = None, clock: Clock = time.time
    ) -> None:
        self._redis = client
        self.key = f"{prefix}:routes"
        self.secret = secret
        self._clock = clock
        self._warned: set[str] = set()

    @classmethod
    def from_url(cls, url: str, prefix: str = "kvrelay", secret: bytes | None = None) -> RedisRouteStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5), prefix, secret)

    def get(self, name: str) -> RouteSpec | None:
        raw = self._redis.hget(self.key, name)
        return None if raw is None else self._decode(name, raw)

    def all(self) -> dict[str, RouteSpec]:
        routes = {}
        for field, raw in self._redis.hgetall(self.key).items():
            name = field.decode() if isinstance(field, bytes) else field
            spec = self._decode(name, raw)
            if spec is not None:
                routes[name] = spec
        return routes

    def set(self, spec: RouteSpec) -> RouteSpec:
        def write(pipe: redis.client.Pipeline) -> RouteSpec:
            new = _operator_write(spec, _stored_revision(pipe.hget(self.key, spec.name)), self._clock())
            pipe.multi()
            pipe.hset(self.key, spec.name, self._encode(new))
            return new

        return self._redis.transaction(write, self.key, value_from_callable=True)

    def apply(self, spec: RouteSpec, expected_revision: int) -> bool:
        new = _judge_write(spec, expected_revision)

        def write(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.hget(self.key, spec.name)
            current = None if raw is None else self._decode(spec.name, raw)
            if current is None or current.revision != expected_revision:
                pipe.unwatch()
                return False
            pipe.multi()
            pipe.hset(self.key, spec.name, self._encode(new))
            return True

        return self._redis.transaction(write, self.key, value_from_callable=True)

    def remove(self, name: str) -> bool:
        return bool(self._redis.hdel(self.key, name))

    def _sign(self, route: dict[str, Any]) -> str:
        if self.secret is None:
            return ""
        body = json.dumps(route, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    def _encode(self, spec: RouteSpec) -> str:
        route = spec.model_dump(mode="json")
        return json.dumps({"route": route, "signature": self._sign(route)})

    def _decode(self, name: str, raw: bytes | str) -> RouteSpec | None:
        try:
            record = json.loads(raw)
            route = record["route"]
            spec = RouteSpec.model_validate(route)
        except (ValueError, KeyError, TypeError) as e:
            return self._ignore(name, raw, f"unreadable ({type(e).__name__})")
        if spec.name != name:
            return self._ignore(name, raw, f"it names route {spec.name!r}")
        if self.secret is not None and not hmac.compare_digest(self._sign(route), str(record.get("signature", ""))):
            return self._ignore(name, raw, "not signed with the shared secret")
        return spec

    def _ignore(self, name: str, raw: bytes | str, why: str) -> None:
        """Warns once per bad record, not on every refresh."""
        tag = f"{name}:{hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()}"
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning("ignoring route record %r in Redis (%s): %s", name, self.key, why)
        return None


def _stored_revision(raw: bytes | str | None) -> int:
    """The revision a record claims, even one that does not verify: an operator's write supersedes it."""
    try:
        return int(json.loads(raw)["route"]["revision"]) if raw is not None else 0
    except (ValueError, KeyError, TypeError):
        return 0
