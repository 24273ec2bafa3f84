"""KV handles are capabilities. The prefill worker that pinned a request's blocks issues a handle
naming them and signs it (HMAC-SHA256 over every field); whoever presents the handle may read
exactly those blocks, and release them, until the lease deadline, and nothing else.

- The key is the prefill worker's: a random one per process by default (the worker verifies the
  handles it issued itself), or a shared secret from settings so that decode workers can verify a
  handle too before they dial the address it names.
- The handle binds the prompt: `prompt_digest` is SHA-256 of its token ids, so KV can never be
  imported under another prompt (the decode worker compares it with the prompt it was given; the
  signature stops anyone from changing it). This holds with or without a shared secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Sequence

from common.errors import PermissionDeniedError
from common.rpc import types_pb2


def prompt_digest(token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def _message(h: types_pb2.KVHandle) -> bytes:
    """The signed bytes: every field but the signature, in a fixed order and encoding."""
    layout = h.layout.SerializeToString(deterministic=True)
    parts = [
        h.worker_id.encode(),
        h.request_id.encode(),
        struct.pack(f"<{len(h.block_ids)}I", *h.block_ids),
        layout,
        h.transfer_endpoint.encode(),
        struct.pack("<dI", h.lease_deadline_unix, h.num_tokens),
        h.prompt_digest,
    ]
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


class HandleSigner:
    def __init__(self, secret: bytes | None = None) -> None:
        self.shared = secret is not None
        self._key = secret if secret is not None else secrets.token_bytes(32)

    def sign(self, h: types_pb2.KVHandle) -> types_pb2.KVHandle:
        h.signature = hmac.new(self._key, _message(h), hashlib.sha256).digest()
        return h

    def verify(self, h: types_pb2.KVHandle, now: float | None = None, check_deadline: bool = True) -> None:
        """Raises PermissionDeniedError unless this key signed exactly this handle and (when asked)
        its lease has not passed. Releasing needs no deadline: freeing blocks late does no harm,
        and a pull that extended the lease must still be able to release."""
        expected = hmac.new(self._key, _message(h), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, h.signature):
            raise PermissionDeniedError(f"the KV handle of request {h.request_id!r} does not verify")
        if check_deadline and (time.time() if now is None else now) > h.lease_deadline_unix:
            raise PermissionDeniedError(f"the KV handle of request {h.request_id!r} has expired")


def check_prompt(h: types_pb2.KVHandle, prompt_token_ids: Sequence[int]) -> None:
    """The decode side: the KV it is about to import was computed for this prompt."""
    if len(h.prompt_digest) != 32 or not hmac.compare_digest(h.prompt_digest, prompt_digest(prompt_token_ids)):
        raise PermissionDeniedError(
            f"the KV handle of request {h.request_id!r} was issued for another prompt; refusing to import it"
        )
