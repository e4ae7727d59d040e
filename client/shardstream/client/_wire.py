"""The client's side of the wire: the only client module that touches `*_pb2`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from shardstream.client._chunkparse import is_chunk, parse_chunk
from shardstream.client._security import ClientSecurity, secure_channel
from shardstream.client.errors import (
    AccessDeniedError,
    DataLossError,
    InvalidRequestError,
    MessageTooLargeError,
    NotFoundError,
    ProtocolError,
    ShardChangedError,
    WorkerError,
)
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import (
    RAGGED,
    TEXT_DTYPES,
    FieldSpec,
    dtype_from_code,
    dtype_name,
    estimated_record_bytes,
    is_ragged,
)
from shardstream.v1.ragged import Ragged

SERVICE = "shardstream.v1.Worker"

Arrays = dict[str, Any]  # per field: an array (records first), or a `Ragged`


@dataclass(frozen=True, slots=True)
class ShardDesc:
    id: str
    records: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class DatasetDesc:
    """What a worker says of a dataset."""

    name: str
    format: str
    shards: tuple[ShardDesc, ...]
    schema: tuple[FieldSpec, ...]
    fingerprint: str
    # With ragged fields: a record's mean bytes in chunks, as the worker measured it on a
    # sample (0: not measured; reads are then sized from a guess)
    record_bytes: int = 0

    @property
    def total_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def sizing_bytes(self) -> int:
        """Bytes a record is taken to have in sizing reads: exact for fixed fields; with
        ragged ones, the measured mean, else `RAGGED_RECORD_GUESS` for each ragged value."""
        return max(1, self.record_bytes or estimated_record_bytes(self.schema))


@dataclass(frozen=True, slots=True)
class Piece:
    """Records [start, start + count) of a shard, decoded to arrays."""

    start: int
    count: int
    arrays: Arrays
    shard: str = ""  # the id the chunk names


def check_piece(piece: Piece, schema: tuple[FieldSpec, ...], shard: str) -> None:
    """Refuse a chunk that is not records of `shard` as `schema` describes them: every
    field once, with its dtype and per-record shape (ProtocolError saying what differs)."""
    if piece.shard != shard:
        raise ProtocolError(f"a chunk of shard {piece.shard!r} in a read of shard {shard!r}")
    names = {f.name for f in schema}
    if piece.arrays.keys() != names:
        missing = sorted(names - piece.arrays.keys())
        extra = sorted(piece.arrays.keys() - names)
        raise ProtocolError(
            f"a chunk's tensors do not match the schema: missing {missing}, unexpected {extra}"
        )
    for spec in schema:
        array = piece.arrays[spec.name]
        if isinstance(array, Ragged) or spec.ragged:
            _check_ragged(spec, array)
        elif array.dtype != np.dtype(spec.dtype) or array.shape[1:] != spec.shape:
            raise ProtocolError(
                f"tensor {spec.name!r} is {array.dtype.name}{list(array.shape[1:])} per record, "
                f"the schema says {spec.dtype}{list(spec.shape)}"
            )
        if spec.dtype == "bool":
            _check_bool(spec.name, array.values if isinstance(array, Ragged) else array)


def _check_bool(name: str, array: np.ndarray[Any, Any]) -> None:
    """BOOL bytes are 0 or 1 (the wire's rule): numpy would keep any other byte, and a
    view or a sum of it would see the lie."""
    if array.size and int(array.view(np.uint8).max()) > 1:
        raise ProtocolError(f"tensor {name!r} holds a BOOL byte other than 0 or 1")


def _check_ragged(spec: FieldSpec, column: Any) -> None:
    """A ragged field's values (its lengths were checked when parsed): item dtype and
    shape as the schema says, and UTF-8 for a string field."""
    if not isinstance(column, Ragged):
        raise ProtocolError(f"tensor {spec.name!r} has no lengths, the schema says ragged {spec}")
    if not spec.ragged:
        raise ProtocolError(
            f"tensor {spec.name!r} has lengths (ragged), the schema says fixed {spec}"
        )
    values = column.values
    storage = "uint8" if spec.dtype in TEXT_DTYPES else spec.dtype
    if values.dtype != np.dtype(storage) or values.shape[1:] != spec.inner:
        raise ProtocolError(
            f"tensor {spec.name!r} holds {values.dtype.name}{list(values.shape[1:])} items, "
            f"the schema says {spec}"
        )
    if spec.dtype == "string":
        try:
            values.tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"tensor {spec.name!r} holds invalid UTF-8 ({exc})") from None
        # Valid as a whole, so each record is too unless one starts inside a character
        # (on a continuation byte, 0b10xxxxxx): then the one before it ends inside it.
        starts = column.offsets[:-1][column.offsets[:-1] < len(values)]
        cut = np.flatnonzero((values[starts] & 0xC0) == 0x80)
        if len(cut):
            raise ProtocolError(
                f"tensor {spec.name!r}: record {int(cut[0])} of the chunk starts inside a "
                "UTF-8 character (each record's string must be valid UTF-8 by itself)"
            )


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """A Read stream's last message: how many records it sent, and why it ended."""

    records_sent: int
    draining: bool


# What no description can hold: more records than a float counts exactly, a record that
# no gRPC message (at most 2 GiB) can carry, more dimensions than numpy's arrays have.
MAX_RECORDS = 1 << 53
MAX_RECORD_BYTES = (1 << 31) - 1
MAX_DIMS = 31  # per record; a batch adds one (numpy: 32 at least)


def _dataset_desc(info: pb.DatasetInfo) -> DatasetDesc:
    """A worker's description, checked: anything that cannot be right is a ProtocolError
    (naming no worker: the caller knows which one answered)."""

    def bad(what: str) -> ProtocolError:
        return ProtocolError(f"the description of dataset {info.name!r} {what}")

    ids: set[str] = set()
    total = 0
    for s in info.shards:
        if not s.id or s.id in ids:
            raise bad(f"lists shard {s.id!r} twice" if s.id else "has a shard without an id")
        ids.add(s.id)
        if s.records < 0:
            raise bad(f"gives shard {s.id!r} {s.records} records")
        total += s.records
    if total > MAX_RECORDS:
        raise bad(f"claims {total} records, more than 2**53")
    if info.total_records and info.total_records != total:
        raise bad(f"claims {info.total_records} records, its shards {total}")
    if not info.schema:
        raise bad("has no fields (an empty schema)")
    schema: list[FieldSpec] = []
    names: set[str] = set()
    for f in info.schema:
        what = f"field {f.name!r}"
        if not f.name or f.name in names:
            raise bad(f"lists {what} twice" if f.name else "has a field without a name")
        names.add(f.name)
        try:
            dtype = dtype_from_code(f.dtype)
            name = dtype_name(f.dtype)
        except ValueError:
            raise bad(f"gives {what} the unknown dtype code {f.dtype}") from None
        shape = tuple(f.shape)
        inner = shape[1:] if shape[:1] == (RAGGED,) and f.ragged else shape
        if (
            len(shape) > MAX_DIMS
            or any(d < 0 for d in inner)
            or math.prod(inner) * dtype.itemsize > MAX_RECORD_BYTES
        ):
            raise bad(
                f"gives {what} the shape {list(shape)}: at most {MAX_DIMS} dimensions, none "
                f"negative (but a ragged field's first, -1), at most {MAX_RECORD_BYTES} bytes "
                "a record"
            )
        text = name in TEXT_DTYPES
        if f.ragged != (text or shape[:1] == (RAGGED,)) or (text and shape):
            raise bad(
                f"gives {what} (dtype {name}, shape {list(shape)}) ragged={f.ragged}: a ragged "
                "field has shape [-1, ...] or is a string/bytes field of shape []"
            )
        schema.append(FieldSpec(name=f.name, dtype=name, shape=shape))
    measured = 0
    if is_ragged(tuple(schema)) and info.record_bytes:
        least = sum(f.record_bytes for f in schema)  # a ragged one's: its length
        if not least <= info.record_bytes <= MAX_RECORD_BYTES:
            raise bad(
                f"gives a record {info.record_bytes} bytes on average: no record of its "
                f"fields takes less than {least} bytes, none more than {MAX_RECORD_BYTES}"
            )
        measured = info.record_bytes
    return DatasetDesc(
        name=info.name,
        format=info.format,
        shards=tuple(ShardDesc(s.id, s.records, s.fingerprint) for s in info.shards),
        schema=tuple(schema),
        fingerprint=info.fingerprint,
        record_bytes=measured,
    )


def encode_read(
    *,
    dataset: str,
    shard: str,
    start: int,
    count: int,
    seed: int,
    fingerprint: str,
    max_chunk_records: int,
    epoch: int = 0,
    lane: str = "",
    lane_stream: int = 0,
    lane_chunk_records: int = 0,
    dataset_fingerprint: str = "",
) -> bytes:
    return pb.ReadRequest(
        dataset=dataset,
        shard=shard,
        start=start,
        count=count,
        seed=seed,
        shard_fingerprint=fingerprint,
        max_chunk_records=max_chunk_records,
        epoch=epoch,
        lane=lane,
        lane_stream=lane_stream,
        lane_chunk_records=lane_chunk_records,
        dataset_fingerprint=dataset_fingerprint,
    ).SerializeToString()


@dataclass(frozen=True, slots=True)
class SharedRef:
    """A chunk in the same-host lane (`_lanes`): its message is in slot `slot`."""

    start: int
    count: int
    shard: str
    slot: int
    size: int


@dataclass(frozen=True, slots=True)
class LaneOffer:
    """A worker's same-host or network lane offer (`OpenLaneResponse`)."""

    address: str
    ticket: bytes
    lane: str
    slots: int
    slot_bytes: int
    port: int = 0  # a network lane's


def decode_response(data: bytes | np.ndarray[Any, Any]) -> Piece | StreamEnd | SharedRef:
    """Turn one streamed message into a Piece (arrays viewing the message), an End, or a
    reference to a chunk in the same-host lane."""
    if is_chunk(data):
        try:
            start, count, shard, arrays = parse_chunk(data)
        except ValueError as exc:
            raise ProtocolError(f"malformed chunk: {exc}") from None
        return Piece(start, count, arrays, shard)
    try:
        msg = pb.ReadResponse.FromString(bytes(data))
    except DecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    kind = msg.WhichOneof("kind")
    if kind == "end":
        return StreamEnd(msg.end.records_sent, msg.end.reason == pb.END_REASON_DRAINING)
    if kind == "shared":
        m = msg.shared
        return SharedRef(m.start, m.count, m.shard, m.slot, m.size)
    raise ProtocolError("a streamed message is neither a chunk nor an end")


class WorkerStub:
    """The Worker service's methods on one channel, with our codecs and call metadata."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Callable[[], tuple[tuple[str, str], ...]] | tuple[tuple[str, str], ...] = (),
    ) -> None:
        """`metadata`: sent with every call; a callable is asked for it at each call."""
        self._metadata = metadata if callable(metadata) else (lambda: metadata)
        self._read = channel.unary_stream(
            f"/{SERVICE}/Read", request_serializer=None, response_deserializer=None
        )
        self._describe = channel.unary_unary(
            f"/{SERVICE}/DescribeDataset",
            request_serializer=pb.DescribeDatasetRequest.SerializeToString,
            response_deserializer=pb.DatasetInfo.FromString,
        )
        self._open_lane = channel.unary_unary(
            f"/{SERVICE}/OpenLane",
            request_serializer=pb.OpenLaneRequest.SerializeToString,
            response_deserializer=pb.OpenLaneResponse.FromString,
        )
        self._list = channel.unary_unary(
            f"/{SERVICE}/ListDatasets",
            request_serializer=pb.ListDatasetsRequest.SerializeToString,
            response_deserializer=pb.ListDatasetsResponse.FromString,
        )

    async def open_lane(
        self, *, timeout: float, slots: int = 0, slot_bytes: int = 0, network: bool = False
    ) -> LaneOffer:
        """Ask for a same-host (or network) lane (AioRpcError where the worker gives none)."""
        reply = await self._open_lane(
            pb.OpenLaneRequest(slots=slots, slot_bytes=slot_bytes, network=network),
            timeout=timeout,
            metadata=self._metadata(),
        )
        return LaneOffer(
            reply.address, reply.ticket, reply.lane, reply.slots, reply.slot_bytes, reply.port
        )

    def read(self, request: bytes) -> grpc.aio.UnaryStreamCall:
        """Start a Read stream (`request` from `encode_read`)."""
        return self._read(request, metadata=self._metadata())

    async def describe(
        self, dataset: str, *, timeout: float, wait_for_ready: bool = True
    ) -> DatasetDesc:
        info = await self._describe(
            pb.DescribeDatasetRequest(dataset=dataset),
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            metadata=self._metadata(),
        )
        return _dataset_desc(info)

    async def list_datasets(self, *, timeout: float) -> list[DatasetDesc]:
        reply = await self._list(
            pb.ListDatasetsRequest(),
            timeout=timeout,
            wait_for_ready=True,
            metadata=self._metadata(),
        )
        return [_dataset_desc(d) for d in reply.datasets]


# Status codes after which the same read may succeed elsewhere or later.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,  # RST_STREAM, GOAWAY mid-stream
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,  # cancelled by the server or a proxy, not by us
    }
)

# Set by a worker on RESOURCE_EXHAUSTED when it is only full (retry later or elsewhere);
# without it, RESOURCE_EXHAUSTED is a message over a size limit, which no retry cures.
BUSY_HEADER = "shardstream-busy"


def is_retryable(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the same read may succeed later or on another worker."""
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return metadata_overflow(exc) or any(
            k == BUSY_HEADER for k, _ in exc.trailing_metadata() or ()
        )
    return exc.code() in RETRYABLE


def metadata_overflow(exc: grpc.aio.AioRpcError) -> bool:
    """Whether gRPC ended the call for headers or a status over its metadata limits (a
    worker's status whose details no client can take): the worker's fault, not a message
    over max_message_bytes, and what the worker meant is lost with the status."""
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in details


_ERRORS: Mapping[grpc.StatusCode, type[WorkerError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: MessageTooLargeError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.FAILED_PRECONDITION: ShardChangedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AccessDeniedError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
}


def worker_error(exc: grpc.aio.AioRpcError, *, worker: str, dataset: str = "") -> WorkerError:
    """The typed error for a non-retryable status, with the worker's details."""
    meta = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    record = meta.get("shardstream-record")
    cls = _ERRORS.get(exc.code(), WorkerError)
    message = exc.details() or exc.code().name
    if cls is MessageTooLargeError and "Sent message larger" in message:
        message += (
            " (a message over the worker's own limit: raise the workers' "
            "--max-message-bytes, and the loader's max_message_bytes with it)"
        )
    elif cls is MessageTooLargeError:
        message += (
            " (a message over a size limit, not a busy worker: raise the loader's "
            "max_message_bytes, or lower the workers' --chunk-bytes)"
        )
    return cls(
        message,
        worker=worker,
        dataset=meta.get("shardstream-dataset") or dataset,
        shard=meta.get("shardstream-shard", ""),
        record=int(record) if record and record.isdigit() else None,
        code=exc.code().name,
    )


async def check_health(
    address: str,
    service: str = "",
    *,
    timeout: float = 5.0,
    security: ClientSecurity | None = None,
) -> tuple[bool, str]:
    """Ask a worker's standard health service; (serving?, a one-line reason)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    what = f"{address} service {service!r}" if service else address
    async with secure_channel(address, (), security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"{what}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}"


# Trailer of a health watch the worker ended on purpose (each runs a bounded time):
# watch again at once, the worker is not gone.
REWATCH_HEADER = "shardstream-rewatch"


class HealthWatch:
    """`Watch` on a worker's health service: an async iterator of SERVING or not."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Callable[[], tuple[tuple[str, str], ...]] | tuple[tuple[str, str], ...] = (),
    ) -> None:
        """`metadata`: sent on each watch (the bearer token: a worker never refuses a
        token holder's watch, where it bounds those without one)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._stub = health_pb2_grpc.HealthStub(channel)
        self._request = health_pb2.HealthCheckRequest(service=SERVICE)
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._metadata = metadata if callable(metadata) else (lambda: metadata)

    def watch(self) -> grpc.aio.UnaryStreamCall:
        """A new Watch call; it waits for the worker to be reachable."""
        return self._stub.Watch(self._request, wait_for_ready=True, metadata=self._metadata())

    @staticmethod
    async def ended_to_rewatch(call: grpc.aio.UnaryStreamCall) -> bool:
        """Whether a watch that ended was ended by the worker to be watched again."""
        trailers = await call.trailing_metadata()
        return any(key == REWATCH_HEADER for key, _ in trailers or ())

    def is_serving(self, reply: Any) -> bool:
        return bool(reply.status == self._serving)
