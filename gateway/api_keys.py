"""API keys: who may use the gateway, for which models, within which limits.

A key is shown once, when it is made (`kvrelay keys add`). Only a salted SHA-256 digest of it is
stored, with a short public id (the 8 characters after `kvr-`) to find the record without a scan;
the digest is compared in constant time. Keys live in a JSON file (mode 0600) and, when a registry
is configured, in a Redis hash, so every gateway replica sees the same keys; gateways re-read the
store every `reload_s`, so a revoked key stops working within seconds. With the deployment's
shared secret, records in Redis are signed (HMAC-SHA256) and gateways ignore unsigned ones, so
write access to Redis alone does not let anyone mint a key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from common.atomic_file import write_atomically

log = logging.getLogger(__name__)
PREFIX = "kvr-"
_ID_CHARS = 8


def default_keys_file() -> str:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "kvrelay", "keys.json")


def _digest(salt: bytes, key: str) -> str:
    return hashlib.sha256(salt + key.encode()).hexdigest()


@dataclass
class ApiKey:
    id: str
    name: str
    salt: str  # hex
    digest: str  # hex SHA-256 of salt + key
    created: float
    revoked: bool = False
    models: list[str] = field(default_factory=list)  # empty: every served model
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute (prompt + max_tokens reserved, corrected at the end)
    cache_salt: str = field(default_factory=lambda: secrets.token_hex(16))  # this tenant's prefix-cache salt
    signature: str = ""  # HMAC-SHA256 (hex) with the shared secret over the rest, for records in Redis
    workload_class: str | None = None  # the class every request of this key runs in (None: its own choice)

    def _signed_bytes(self) -> bytes:
        fields = {**asdict(self), "signature": ""}
        if fields["workload_class"] is None:  # records signed before keys had classes still verify
            del fields["workload_class"]
        return json.dumps(fields, sort_keys=True).encode()

    def sign(self, secret: bytes) -> None:
        self.signature = hmac.new(secret, self._signed_bytes(), hashlib.sha256).hexdigest()

    def signed_by(self, secret: bytes) -> bool:
        expected = hmac.new(secret, self._signed_bytes(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.signature)

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(_digest(bytes.fromhex(self.salt), key), self.digest)

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def public(self) -> dict:
        """What `kvrelay keys ls` shows: never the digest or the salt."""
        return {
            "id": self.id,
            "name": self.name,
            "created": self.created,
            "revoked": self.revoked,
            "models": self.models,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "workload_class": self.workload_class,
        }


def new_key(  # noqa: ANN201
    name: str,
    models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    workload_class: str | None = None,
):
    """(the key, its record). The key itself is never stored."""
    key = PREFIX + secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = ApiKey(key[len(PREFIX) : len(PREFIX) + _ID_CHARS], name, salt.hex(), _digest(salt, key), time.time())
    record.models, record.rpm, record.tpm = list(models or []), rpm, tpm
    record.workload_class = workload_class
    return key, record


class KeyStore:
    """The keys, from a file and (optionally) Redis. Reads are served from memory."""

    def __init__(
        self,
        path: str | None = None,
        redis_url: str | None = None,
        prefix: str = "kvrelay",
        secret: bytes | None = None,
    ) -> None:
        self.path = Path(path or default_keys_file())
        self.secret = secret
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5) if redis_url else None
        self._hash = f"{prefix}:api-keys"
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------------
    def load(self) -> dict[str, ApiKey]:
        keys: dict[str, ApiKey] = {}
        if self.path.is_file():
            for raw in json.loads(self.path.read_text()).get("keys", []):
                rec = ApiKey(**raw)
                keys[rec.id] = rec
        if self._redis is not None:
            for raw in self._redis.hvals(self._hash):
                rec = ApiKey(**json.loads(raw))
                if self.secret is not None and not rec.signed_by(self.secret):
                    log.warning("ignoring API key record %s in Redis: not signed with the shared secret", rec.id)
                    continue
                keys[rec.id] = rec  # Redis is shared by the replicas: it wins
        with self._lock:
            self._keys = keys
        return keys

    def reload(self) -> None:
        try:
            self.load()
        except (OSError, ValueError, TypeError, redis.RedisError) as e:
            log.warning("keeping the API keys last read; reading them failed: %s", e)

    def verify(self, key: str) -> ApiKey | None:
        """The key's record if the key is valid and not revoked, else None (same answer for unknown
        and revoked keys: no oracle)."""
        if not key.startswith(PREFIX) or len(key) < len(PREFIX) + _ID_CHARS:
            return None
        rec = self._keys.get(key[len(PREFIX) : len(PREFIX) + _ID_CHARS])
        if rec is None or not rec.matches(key) or rec.revoked:
            return None
        return rec

    def __len__(self) -> int:
        return len(self._keys)

    # -- writing (the CLI) -----------------------------------------------------------------------
    def add(  # noqa: ANN201
        self,
        name: str,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        workload_class: str | None = None,
    ):
        keys = self.load()
        if any(k.name == name and not k.revoked for k in keys.values()):
            raise ValueError(f"a key named {name!r} exists; revoke it first or pick another name")
        key, rec = new_key(name, models, rpm, tpm, workload_class)
        keys[rec.id] = rec
        self._save(keys, rec)
        return key, rec

    def revoke(self, id_or_name: str) -> ApiKey:
        keys = self.load()
        hits = [k for k in keys.values() if (k.id == id_or_name or k.name == id_or_name) and not k.revoked]
        if not hits:
            raise KeyError(f"no live key with id or name {id_or_name!r}")
        for rec in hits:
            rec.revoked = True
            self._save(keys, rec)
        return hits[0]

    def _save(self, keys: dict[str, ApiKey], changed: ApiKey) -> None:
        if self._redis is not None:
            if self.secret is not None:
                changed.sign(self.secret)
            self._redis.hset(self._hash, changed.id, json.dumps(asdict(changed)))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = json.dumps({"keys": [asdict(k) for k in keys.values()]}, indent=1)
        write_atomically(self.path, body, 0o600)
