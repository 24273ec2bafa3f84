"""Between the engine's dataclasses and the wire messages. One function per direction per type."""

from __future__ import annotations

from common.engine.sampling import SamplingParams
from common.kv.layout import KVLayout
from common.rpc import types_pb2


def params_to_proto(p: SamplingParams) -> types_pb2.SamplingParams:
    msg = types_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def params_from_proto(msg: types_pb2.SamplingParams) -> SamplingParams:
    """Validated; raises InvalidRequestError. An unset top_p (0, invalid anyway) means 1."""
    return SamplingParams.create(
        max_tokens=msg.max_tokens,
        temperature=round(msg.temperature, 6),  # undo float32 noise: 0.7 travels as 0.699999988
        top_p=round(msg.top_p, 6) or 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )


def layout_to_proto(layout: KVLayout) -> types_pb2.KVLayout:
    return types_pb2.KVLayout(**layout.to_dict())


def layout_from_proto(msg: types_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        model_id=msg.model_id,
        dtype=msg.dtype,
        block_size=msg.block_size,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        order=msg.order,
    )
