"""What a worker announces about itself in the registry, and where in Redis it lives.

Keys (all under one prefix, "kvrelay" by default):
  {prefix}:worker:{worker_id}                  JSON WorkerRecord, expires unless heartbeats renew it
  {prefix}:workers                             Set of the worker ids that may have a record: what
                                               gateways read instead of SCANning the keyspace (a
                                               SCAN walks every key of the database on each poll)
  {prefix}:kv-events:{worker_id}:{incarnation} Redis Stream of the worker's KV block events
A restarted worker gets a new incarnation, hence a fresh stream, so readers never mistake its
restarted sequence numbers for replays.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field


class WorkerRecord(BaseModel):
    worker_id: str = Field(min_length=1)
    role: Literal["prefill", "decode"]
    address: str = Field(min_length=3)
    model_id: str  # the first model's
    models: list[str] = Field(default_factory=list)  # every model it serves, loaded or not
    layout: dict[str, str | int]
    total_blocks: int = Field(ge=0)
    max_model_len: int = Field(ge=0)
    transfer_backends: list[str]
    incarnation: str = Field(min_length=1)
    started_at: float
    events_stream: str = ""
    # HMAC-SHA256 (hex) over the rest, with the deployment's shared secret: only a worker that holds
    # it can put a record that gateways accept (when they have the secret too).
    signature: str = ""

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    def _signed_bytes(self) -> bytes:
        # `models` is signed only when it says more than `model_id` does, so records of one model
        # verify alike for readers from before the field existed and after (rolling upgrades).
        one_model = self.models in ([], [self.model_id])
        return (
            self.model_copy(update={"signature": ""})
            .model_dump_json(exclude={"models"} if one_model else None)
            .encode()
        )

    def signed(self, secret: bytes | None) -> WorkerRecord:
        if secret is None:
            return self
        return self.model_copy(update={"signature": hmac.new(secret, self._signed_bytes(), hashlib.sha256).hexdigest()})

    def verified(self, secret: bytes | None) -> bool:
        """True if no secret is required, or the record carries a valid signature for it."""
        if secret is None:
            return True
        expected = hmac.new(secret, self._signed_bytes(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.signature)

    @classmethod
    def decode(cls, raw: bytes | str) -> WorkerRecord:
        return cls.model_validate_json(raw)


@dataclass(frozen=True)
class RegistryKeys:
    prefix: str = "kvrelay"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def events(self, worker_id: str, incarnation: str) -> str:
        return f"{self.prefix}:kv-events:{worker_id}:{incarnation}"
