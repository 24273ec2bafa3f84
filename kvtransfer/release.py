"""The client half of Release, torch-free (the gateway calls it too, to unpin the KV of a request
whose decode never started)."""

from __future__ import annotations

from common.rpc import kv_pb2, kv_pb2_grpc, types_pb2
from common.rpc.channels import ChannelPool
from common.tracing.grpc_context import outgoing_metadata


async def release(channels: ChannelPool, handle: types_pb2.KVHandle, timeout: float = 5.0) -> bool:
    """Unpin the handle's blocks on its prefill worker. False if they were no longer pinned."""
    stub = kv_pb2_grpc.KVServiceStub(channels.get(handle.transfer_endpoint))
    resp = await stub.Release(kv_pb2.ReleaseRequest(handle=handle), timeout=timeout, metadata=outgoing_metadata())
    return resp.released
