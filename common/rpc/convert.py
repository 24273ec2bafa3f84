"""Between the engine's dataclasses and the wire messages. One function per direction per type."""

from __future__ import annotations

import dataclasses

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
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=dict(p.logit_bias),
        prior_output_tokens=p.prior_output_tokens,
        cache_salt=p.cache_salt,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def params_from_proto(msg: types_pb2.SamplingParams) -> SamplingParams:
    """Validated; raises InvalidRequestError. An unset top_p or repetition_penalty means 1 (off); a
    top_p sent as 0 stays 0 and is refused, rather than silently becoming 1."""
    params = SamplingParams.create(
        max_tokens=msg.max_tokens,
        temperature=_from_float32(msg.temperature),
        top_p=_from_float32(msg.top_p) if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        presence_penalty=_from_float32(msg.presence_penalty),
        frequency_penalty=_from_float32(msg.frequency_penalty),
        repetition_penalty=_from_float32(msg.repetition_penalty) if msg.HasField("repetition_penalty") else 1.0,
        logit_bias={t: _from_float32(b) for t, b in msg.logit_bias.items()},
    )
    return dataclasses.replace(params, prior_output_tokens=msg.prior_output_tokens, cache_salt=msg.cache_salt)


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
        weights=msg.weights,
    )


def _from_float32(x: float) -> float:
    """Undo float32 noise (0.7 travels as 0.699999988) without rounding small values away: seven
    significant digits, so top_p = 1e-7 stays 1e-7 and does not become 0 (= unset = 1.0)."""
    return float(f"{x:.7g}")
