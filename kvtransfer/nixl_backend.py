"""KV over NIXL (UCX): each worker registers its whole KV cache with a NIXL agent once; the decode
side READs the prefill side's blocks straight into its own reserved blocks, no copies in between.

The metadata exchange (agent metadata and serialized block descriptors) rides on the KV service's
NixlHandshake RPC. On CPU the cache is DRAM; on a GPU the same code registers VRAM.
"""

from __future__ import annotations

import asyncio
import os
import time

from common.kv.cache import KVCache
from common.rpc import kv_pb2, kv_pb2_grpc, types_pb2
from common.rpc.channels import ChannelPool
from common.rpc.convert import layout_to_proto
from common.tracing.grpc_context import outgoing_metadata
from kvtransfer.base import TransferResult, check_handle

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def restrict_ucx(net_devices: str | None, host: str) -> str | None:
    """Make the UCX agent listen where the worker's settings say, before any agent exists: the
    devices asked for, or only the loopback device when the worker itself listens on loopback
    (otherwise UCX listens on every interface of the machine). An UCX_NET_DEVICES already in the
    environment is the operator's choice and wins. Returns the devices in effect (None: all)."""
    if "UCX_NET_DEVICES" not in os.environ:
        chosen = net_devices or ("lo" if host in _LOOPBACK else None)
        if chosen:
            os.environ["UCX_NET_DEVICES"] = chosen
    return os.environ.get("UCX_NET_DEVICES")


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:  # ImportError, or a native library that fails to load
        return False
    return True


class _Agent:
    """A NIXL agent over one KV cache tensor."""

    def __init__(self, cache: KVCache, name: str) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.cache = cache
        self.name = name
        # No progress thread: it busy-polls a core even when idle. The reading side progresses
        # while it waits for its READ; the serving side progresses only while a pull may be active.
        self.agent = nixl_agent(name, nixl_agent_config(backends=["UCX"], enable_prog_thread=False))
        self.mem = "VRAM" if cache.tensor.is_cuda else "DRAM"
        self.dev = cache.tensor.device.index or 0
        self._reg = self.agent.register_memory(cache.tensor)

    def block_descs(self, block_ids: list[int]):  # noqa: ANN201 - nixl descriptor list
        base, size = self.cache.tensor.data_ptr(), self.cache.layout.block_bytes
        return self.agent.get_xfer_descs([(base + b * size, size, self.dev) for b in block_ids], self.mem)

    def close(self) -> None:
        self.agent.deregister_memory(self._reg)


class NixlKVServer:
    """Prefill side: answers handshakes with the descriptors of a pinned request's blocks, and drives
    its agent's progress while any handshaken pull may still be reading (transports that emulate
    one-sided reads, such as TCP, need the target to progress)."""

    _PROGRESS_S = 0.001

    def __init__(self, cache: KVCache, name: str) -> None:
        self._agent = _Agent(cache, name)
        self._active: dict[str, float] = {}  # request id -> monotonic deadline
        self._progress: asyncio.Task | None = None

    def handshake(self, request_id: str, block_ids: list[int], lease_s: float) -> kv_pb2.NixlHandshakeResponse:
        a = self._agent
        self._active[request_id] = time.monotonic() + lease_s
        if self._progress is None or self._progress.done():
            self._progress = asyncio.get_running_loop().create_task(self._drive_progress())
        return kv_pb2.NixlHandshakeResponse(
            agent_name=a.name,
            agent_metadata=a.agent.get_agent_metadata(),
            block_descriptors=a.agent.get_serialized_descs(a.block_descs(block_ids)),
        )

    def done(self, request_id: str) -> None:
        """The pull is over (released): stop progressing for it."""
        self._active.pop(request_id, None)

    async def _drive_progress(self) -> None:
        while self._active:
            self._agent.agent.get_new_notifs()  # makes the backend progress
            now = time.monotonic()
            for rid in [r for r, deadline in self._active.items() if deadline <= now]:
                del self._active[rid]
            await asyncio.sleep(self._PROGRESS_S)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.cancel()
        self._agent.close()


class NixlTransferClient:
    backend = "nixl"
    _POLL_S = 0.0002

    def __init__(self, cache: KVCache, channels: ChannelPool, name: str) -> None:
        self.cache = cache
        self.channels = channels
        self._agent = _Agent(cache, name)
        self._known: set[str] = set()

    def close(self) -> None:
        self._agent.close()

    async def pull(self, handle: types_pb2.KVHandle, dst_block_ids: list[int], timeout: float) -> TransferResult:
        check_handle(self.cache.layout, handle, dst_block_ids)
        a = self._agent
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        stub = kv_pb2_grpc.KVServiceStub(self.channels.get(handle.transfer_endpoint))
        resp = await stub.NixlHandshake(
            kv_pb2.NixlHandshakeRequest(
                handle=handle,
                layout=layout_to_proto(self.cache.layout),
                agent_name=a.name,
                agent_metadata=a.agent.get_agent_metadata(),
            ),
            timeout=timeout,
            metadata=outgoing_metadata(),
        )
        if resp.agent_name not in self._known:
            a.agent.add_remote_agent(resp.agent_metadata)
            self._known.add(resp.agent_name)
        remote = a.agent.deserialize_descs(resp.block_descriptors)
        xfer = a.agent.initialize_xfer("READ", a.block_descs(dst_block_ids), remote, resp.agent_name)
        try:
            state = a.agent.transfer(xfer)
            while state != "DONE":
                if state == "ERR":
                    raise ConnectionError(f"NIXL READ from {resp.agent_name} failed")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL READ from {resp.agent_name} did not finish in {timeout:.1f}s")
                await asyncio.sleep(self._POLL_S)
                state = a.agent.check_xfer_state(xfer)
        finally:
            a.agent.release_xfer_handle(xfer)
        n = len(dst_block_ids)
        return TransferResult(self.backend, n, n * self.cache.layout.block_bytes, time.perf_counter() - t0)
