from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_UINT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_STRING: _ClassVar[DType]
    DTYPE_BYTES: _ClassVar[DType]

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_COMPLETE: _ClassVar[EndReason]
    END_REASON_DRAINING: _ClassVar[EndReason]
DTYPE_UNSPECIFIED: DType
DTYPE_BOOL: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
DTYPE_UINT16: DType
DTYPE_UINT32: DType
DTYPE_UINT64: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_STRING: DType
DTYPE_BYTES: DType
END_REASON_UNSPECIFIED: EndReason
END_REASON_COMPLETE: EndReason
END_REASON_DRAINING: EndReason

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "lengths", "pad")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    lengths: _containers.RepeatedScalarFieldContainer[int]
    pad: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., lengths: _Optional[_Iterable[int]] = ..., pad: _Optional[bytes] = ...) -> None: ...

class FieldSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "ragged")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAGGED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    ragged: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., ragged: _Optional[bool] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("id", "records", "fingerprint")
    ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    records: int
    fingerprint: str
    def __init__(self, id: _Optional[str] = ..., records: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "format", "shards", "schema", "fingerprint", "total_records", "record_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    schema: _containers.RepeatedCompositeFieldContainer[FieldSpec]
    fingerprint: str
    total_records: int
    record_bytes: int
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., schema: _Optional[_Iterable[_Union[FieldSpec, _Mapping]]] = ..., fingerprint: _Optional[str] = ..., total_records: _Optional[int] = ..., record_bytes: _Optional[int] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("dataset", "shard", "start", "count", "seed", "shard_fingerprint", "max_chunk_records", "epoch", "lane", "lane_stream", "lane_chunk_records", "dataset_fingerprint")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHARD_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_RECORDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    LANE_STREAM_FIELD_NUMBER: _ClassVar[int]
    LANE_CHUNK_RECORDS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    shard: str
    start: int
    count: int
    seed: int
    shard_fingerprint: str
    max_chunk_records: int
    epoch: int
    lane: str
    lane_stream: int
    lane_chunk_records: int
    dataset_fingerprint: str
    def __init__(self, dataset: _Optional[str] = ..., shard: _Optional[str] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., seed: _Optional[int] = ..., shard_fingerprint: _Optional[str] = ..., max_chunk_records: _Optional[int] = ..., epoch: _Optional[int] = ..., lane: _Optional[str] = ..., lane_stream: _Optional[int] = ..., lane_chunk_records: _Optional[int] = ..., dataset_fingerprint: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("start", "count", "tensors", "shard")
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    start: int
    count: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    shard: str
    def __init__(self, start: _Optional[int] = ..., count: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., shard: _Optional[str] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("records_sent", "reason")
    RECORDS_SENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    records_sent: int
    reason: EndReason
    def __init__(self, records_sent: _Optional[int] = ..., reason: _Optional[_Union[EndReason, str]] = ...) -> None: ...

class SharedChunk(_message.Message):
    __slots__ = ("start", "count", "shard", "slot", "size")
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    start: int
    count: int
    shard: str
    slot: int
    size: int
    def __init__(self, start: _Optional[int] = ..., count: _Optional[int] = ..., shard: _Optional[str] = ..., slot: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("chunk", "end", "shared")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    end: End
    shared: SharedChunk
    def __init__(self, chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., shared: _Optional[_Union[SharedChunk, _Mapping]] = ...) -> None: ...

class OpenLaneRequest(_message.Message):
    __slots__ = ("slots", "slot_bytes", "network")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    slots: int
    slot_bytes: int
    network: bool
    def __init__(self, slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., network: _Optional[bool] = ...) -> None: ...

class OpenLaneResponse(_message.Message):
    __slots__ = ("address", "ticket", "lane", "slots", "slot_bytes", "ticket_seconds", "port")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TICKET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    ticket: bytes
    lane: str
    slots: int
    slot_bytes: int
    ticket_seconds: float
    port: int
    def __init__(self, address: _Optional[str] = ..., ticket: _Optional[bytes] = ..., lane: _Optional[str] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., ticket_seconds: _Optional[float] = ..., port: _Optional[int] = ...) -> None: ...
