from . import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ok", "worker_id", "role")
    OK_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    worker_id: str
    role: str
    def __init__(self, ok: _Optional[bool] = ..., worker_id: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker_id", "role", "model_id", "layout", "waiting", "running", "pinned", "free_blocks", "total_blocks", "cached_blocks", "prefix_query_tokens", "prefix_hit_tokens", "transfer_backends", "transfer_endpoint", "max_model_len", "draining", "models", "memory_budget_bytes", "pool")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    model_id: str
    layout: _types_pb2.KVLayout
    waiting: int
    running: int
    pinned: int
    free_blocks: int
    total_blocks: int
    cached_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    transfer_backends: _containers.RepeatedScalarFieldContainer[str]
    transfer_endpoint: str
    max_model_len: int
    draining: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelStats]
    memory_budget_bytes: int
    pool: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., model_id: _Optional[str] = ..., layout: _Optional[_Union[_types_pb2.KVLayout, _Mapping]] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., pinned: _Optional[int] = ..., free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., prefix_query_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., transfer_backends: _Optional[_Iterable[str]] = ..., transfer_endpoint: _Optional[str] = ..., max_model_len: _Optional[int] = ..., draining: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelStats, _Mapping]]] = ..., memory_budget_bytes: _Optional[int] = ..., pool: _Optional[str] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("model_id", "loaded", "layout", "waiting", "running", "pinned", "free_blocks", "total_blocks", "max_model_len", "footprint_bytes", "loads", "evictions")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    loaded: bool
    layout: _types_pb2.KVLayout
    waiting: int
    running: int
    pinned: int
    free_blocks: int
    total_blocks: int
    max_model_len: int
    footprint_bytes: int
    loads: int
    evictions: int
    def __init__(self, model_id: _Optional[str] = ..., loaded: _Optional[bool] = ..., layout: _Optional[_Union[_types_pb2.KVLayout, _Mapping]] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., pinned: _Optional[int] = ..., free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., max_model_len: _Optional[int] = ..., footprint_bytes: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("after_seq",)
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    def __init__(self, after_seq: _Optional[int] = ...) -> None: ...

class KVEvent(_message.Message):
    __slots__ = ("seq", "kind", "block_hash", "parent_hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    block_hash: int
    parent_hash: int
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., block_hash: _Optional[int] = ..., parent_hash: _Optional[int] = ...) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("events", "snapshot", "snapshot_hashes", "last_seq")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_HASHES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    snapshot: bool
    snapshot_hashes: _containers.RepeatedScalarFieldContainer[int]
    last_seq: int
    def __init__(self, events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ..., snapshot: _Optional[bool] = ..., snapshot_hashes: _Optional[_Iterable[int]] = ..., last_seq: _Optional[int] = ...) -> None: ...
