from . import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullBlocksRequest(_message.Message):
    __slots__ = ("handle", "layout", "blocks_per_chunk", "first_block", "num_blocks")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    handle: _types_pb2.KVHandle
    layout: _types_pb2.KVLayout
    blocks_per_chunk: int
    first_block: int
    num_blocks: int
    def __init__(self, handle: _Optional[_Union[_types_pb2.KVHandle, _Mapping]] = ..., layout: _Optional[_Union[_types_pb2.KVLayout, _Mapping]] = ..., blocks_per_chunk: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("first_block", "num_blocks", "data")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    num_blocks: int
    data: bytes
    def __init__(self, first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class NixlHandshakeRequest(_message.Message):
    __slots__ = ("handle", "layout", "agent_name", "agent_metadata")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    handle: _types_pb2.KVHandle
    layout: _types_pb2.KVLayout
    agent_name: str
    agent_metadata: bytes
    def __init__(self, handle: _Optional[_Union[_types_pb2.KVHandle, _Mapping]] = ..., layout: _Optional[_Union[_types_pb2.KVLayout, _Mapping]] = ..., agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ...) -> None: ...

class NixlHandshakeResponse(_message.Message):
    __slots__ = ("agent_name", "agent_metadata", "block_descriptors")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    agent_metadata: bytes
    block_descriptors: bytes
    def __init__(self, agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., block_descriptors: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: _types_pb2.KVHandle
    def __init__(self, handle: _Optional[_Union[_types_pb2.KVHandle, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
