"""Which prefill workers a decode worker may pull KV from. A request names the address in its
handle, and the decode worker would dial it: so the address must be one it already trusts, never
merely one a request names.

In order:
1. With the deployment's shared secret (`shared_secret_file`), the handle is verified here, before any
   dial: only a prefill worker holding the key can have issued it, so its address is genuine.
2. An address in `prefill_peers` (the static list `kvrelay up` and manifests pass) is trusted.
3. With a registry, the handle's worker id must have a live prefill record at that address (signed,
   when the deployment has a shared secret).
4. With none of these, only loopback addresses are dialled (a single-machine deployment).
Whatever the address, the prompt binding is checked too (`kvtransfer.handles.check_prompt`).
"""

from __future__ import annotations

import ipaddress
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.discovery.record import RegistryKeys, WorkerRecord
from common.errors import PermissionDeniedError
from common.rpc import types_pb2
from kvtransfer.handles import HandleSigner

log = logging.getLogger(__name__)
_CACHE_S = 2.0


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TrustedSources:
    def __init__(
        self,
        signer: HandleSigner | None,
        peers: list[str],
        registry: Redis | None = None,
        keys: RegistryKeys | None = None,
        record_secret: bytes | None = None,
    ) -> None:
        self.record_secret = record_secret
        self.signer = signer
        self.peers = frozenset(peers)
        self.registry = registry
        self.keys = keys or RegistryKeys()
        self._seen: dict[tuple[str, str], float] = {}  # (worker id, address) -> when confirmed

    async def check(self, handle: types_pb2.KVHandle) -> None:
        """Raises PermissionDeniedError unless the handle's source may be dialled."""
        address = handle.transfer_endpoint
        if self.signer is not None:
            self.signer.verify(handle)
            return
        if address in self.peers:
            return
        if self.registry is not None:
            if await self._registered(handle.worker_id, address):
                return
        elif not self.peers and is_loopback(address):
            return
        raise PermissionDeniedError(f"{address!r} is not a known prefill worker; refusing to pull KV from it")

    async def _registered(self, worker_id: str, address: str) -> bool:
        key = (worker_id, address)
        if time.monotonic() - self._seen.get(key, -_CACHE_S) < _CACHE_S:
            return True
        try:
            raw = await self.registry.get(self.keys.worker(worker_id))  # type: ignore[union-attr]
        except (RedisError, OSError) as e:
            log.warning("registry unreachable while checking a KV source: %s", e)
            return False
        if raw is None:
            return False
        try:
            rec = WorkerRecord.decode(raw)
        except ValueError:
            return False
        if rec.role == "prefill" and rec.address == address and rec.verified(self.record_secret):
            self._seen[key] = time.monotonic()
            return True
        return False
