"""The worker's side of the wire: the only server module that touches `*_pb2`.

Chunks are serialized by hand: the protobuf header bytes followed by each
array's memory, so tensor data is copied once (into the message) and never
goes through a protobuf object. The result is ordinary protobuf on the wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from shardstream.server.errors import MalformedRequestError
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import FieldSpec, dtype_code
from shardstream.v1.ragged import Ragged

if TYPE_CHECKING:
    from shardstream.server._catalog import Dataset
    from shardstream.server._servicer import WorkerServicer

SERVICE = "shardstream.v1.Worker"


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_key(field: int) -> bytes:
    return _varint(field << 3 | 2)


def _int_key(field: int) -> bytes:
    return _varint(field << 3)


Column = np.ndarray[Any, Any] | Ragged  # a fixed field's array, or a ragged field's values


def encode_chunk(
    start: int,
    arrays: Mapping[str, Column],
    shard: str = "",
    schema: tuple[FieldSpec, ...] = (),
) -> bytes:
    """A serialized `ReadResponse{chunk}` holding records [start, start + count) of `shard`.

    A ragged field is a `Ragged`: its Tensor holds the values and their `lengths`; the
    dtype of a "string" / "bytes" field comes from `schema` (its values are uint8)."""
    return b"".join(_chunk_parts(start, arrays, shard, schema))


def _chunk_head(start: int, count: int, shard: str) -> list[bytes]:
    """A Chunk's fields before its tensors: start, count and the shard's id."""
    head = [_int_key(1), _varint(start), _int_key(2), _varint(count)]
    if shard:
        shard_b = shard.encode()
        head += [_len_key(4), _varint(len(shard_b)), shard_b]
    return head


def layout_chunk_into(
    buf: memoryview, start: int, count: int, schema: tuple[FieldSpec, ...], shard: str = ""
) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
    """Write a chunk's protobuf headers into `buf` and leave room for its tensors.

    Returns the chunk's size and, per schema field, a writable array over the room for
    its data (shape (count, *field.shape), little-endian): whoever fills those arrays
    completes the same bytes `encode_chunk` would produce, without an intermediate copy.
    """
    body: list[bytes | tuple[str, np.dtype[Any], tuple[int, ...]]] = [
        *_chunk_head(start, count, shard)
    ]
    if any(f.ragged for f in schema):
        raise ValueError("a chunk with ragged fields has no fixed layout; use encode_chunk")
    for spec in schema:
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        shape = (count, *spec.shape)
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header = _tensor_header(spec.name, dtype, shape, nbytes)
        body += [_len_key(3), _varint(len(header) + nbytes), header, (spec.name, dtype, shape)]
    body_size = sum(len(p) if isinstance(p, bytes) else _nbytes(p) for p in body)
    pieces = [_len_key(1), _varint(body_size), *body]
    total = sum(len(p) if isinstance(p, bytes) else _nbytes(p) for p in pieces)
    if total > len(buf):
        raise ValueError(f"a chunk of {total} bytes does not fit its buffer of {len(buf)}")
    views: dict[str, np.ndarray[Any, Any]] = {}
    pos = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            buf[pos : pos + len(piece)] = piece
            pos += len(piece)
        else:
            name, dtype, shape = piece
            n = _nbytes(piece)
            views[name] = np.frombuffer(buf[pos : pos + n], dtype=dtype).reshape(shape)
            pos += n
    return total, views


def _nbytes(piece: tuple[str, np.dtype[Any], tuple[int, ...]]) -> int:
    _, dtype, shape = piece
    return dtype.itemsize * int(np.prod(shape, dtype=np.int64))


def _tensor_header(
    name: str, dtype: np.dtype[Any] | str, shape: tuple[int, ...], nbytes: int
) -> bytes:
    """A Tensor message's fields before its data: name, dtype, shape, data's key+length."""
    name_b = name.encode()
    dims = b"".join(_varint(d) for d in shape)
    return b"".join(
        [
            _len_key(1), _varint(len(name_b)), name_b,
            _int_key(2), _varint(dtype_code(dtype)),
            _len_key(3), _varint(len(dims)), dims,
            _len_key(4), _varint(nbytes),
        ]
    )  # fmt: skip


def _little(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _chunk_parts(
    start: int, arrays: Mapping[str, Column], shard: str, schema: tuple[FieldSpec, ...] = ()
) -> list[bytes | memoryview]:
    """The pieces of a serialized chunk: protobuf headers and the arrays' own memory."""
    count = len(next(iter(arrays.values())))
    text = {f.name: f.dtype for f in schema if not f.shape and f.ragged}
    body: list[bytes | memoryview] = [*_chunk_head(start, count, shard)]
    for name, column in arrays.items():
        if isinstance(column, Ragged):
            a = _little(column.values)
            lengths = column.lengths.astype("<i8", copy=False)
            header = _tensor_header(name, text.get(name, a.dtype), a.shape, a.nbytes)
            # lengths: packed sfixed64 (field 5), always written, also when empty
            tail = _len_key(5) + _varint(lengths.nbytes)
            size = len(header) + a.nbytes + len(tail) + lengths.nbytes
            body += [_len_key(3), _varint(size), header, a.reshape(-1).view(np.uint8).data]
            body += [tail, lengths.view(np.uint8).data]
            continue
        a = _little(column)
        header = _tensor_header(name, a.dtype, a.shape, a.nbytes)
        body += [_len_key(3), _varint(len(header) + a.nbytes), header]
        body.append(a.reshape(-1).view(np.uint8).data)
    size = sum(len(b) for b in body)
    return [_len_key(1), _varint(size), *body]


def encode_end(records_sent: int, *, draining: bool) -> bytes:
    reason = pb.END_REASON_DRAINING if draining else pb.END_REASON_COMPLETE
    end = pb.End(records_sent=records_sent, reason=reason)
    return pb.ReadResponse(end=end).SerializeToString()


@dataclass(frozen=True, slots=True)
class ReadArgs:
    """A decoded ReadRequest."""

    dataset: str
    shard: str
    start: int
    count: int
    seed: int = 0
    shard_fingerprint: str = ""
    max_chunk_records: int = 0
    epoch: int = 0  # with `seed`: what a dataset's per-record randomness depends on


# Requests are decoded by the handlers, not by gRPC: bytes that do not parse become
# a MalformedRequestError (INVALID_ARGUMENT) naming what was expected, never a
# traceback and UNKNOWN; and only once the call passed the interceptors (the token).
MAX_ID_BYTES = 4096  # longest dataset name or shard id read (PATH_MAX); longer: refused
MAX_FINGERPRINT_BYTES = 256  # fingerprints are hex digests, far shorter


def _parse(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except (DecodeError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a string
        raise MalformedRequestError(
            f"the request is not a {cls.DESCRIPTOR.name} ({len(data)} bytes): {exc}"
        ) from None


def _bounded(what: str, value: str, limit: int = MAX_ID_BYTES) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise MalformedRequestError(
            f"the {what} in the request has {size} bytes, more than the {limit} any served "
            f"one has; starts {value[:64]!r}"
        )
    return value


def decode_read(data: bytes) -> ReadArgs:
    """A ReadRequest's fields, or MalformedRequestError."""
    r = _parse(pb.ReadRequest, data)
    return ReadArgs(
        dataset=_bounded("dataset name", r.dataset),
        shard=_bounded("shard id", r.shard),
        start=r.start,
        count=r.count,
        seed=r.seed,
        shard_fingerprint=_bounded("shard fingerprint", r.shard_fingerprint, MAX_FINGERPRINT_BYTES),
        max_chunk_records=r.max_chunk_records,
        epoch=r.epoch,
    )


def decode_describe(data: bytes) -> str:
    """The dataset name a DescribeDatasetRequest asks for, or MalformedRequestError."""
    return _bounded("dataset name", _parse(pb.DescribeDatasetRequest, data).dataset)


def decode_list(data: bytes) -> None:
    """Check a ListDatasetsRequest (it has no fields), or MalformedRequestError."""
    _parse(pb.ListDatasetsRequest, data)


def dataset_info(ds: Dataset) -> pb.DatasetInfo:
    return pb.DatasetInfo(
        name=ds.name,
        format=ds.format,
        shards=[
            pb.ShardInfo(id=s.id, records=s.records, fingerprint=s.fingerprint) for s in ds.shards
        ],
        schema=[
            pb.FieldSpec(
                name=f.name, dtype=cast(Any, dtype_code(f.dtype)), shape=f.shape, ragged=f.ragged
            )
            for f in ds.schema
        ],
        fingerprint=ds.fingerprint,
        total_records=ds.total_records,
    )


def _identity(data: bytes) -> bytes:
    return data


def service_handler(servicer: WorkerServicer) -> grpc.GenericRpcHandler:
    """The Worker service, with hand-serialized chunks, for `server.add_generic_rpc_handlers`.

    Handlers get the request's bytes (see `decode_read`); Read writes its chunks itself
    (`serve_read`: each write within the stall timeout)."""
    describe: Callable[[bytes, Any], Awaitable[Dataset]] = servicer.describe
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Read": grpc.unary_stream_rpc_method_handler(
                servicer.serve_read, request_deserializer=None, response_serializer=_identity
            ),
            "DescribeDataset": grpc.unary_unary_rpc_method_handler(
                describe,
                request_deserializer=None,
                response_serializer=lambda ds: dataset_info(ds).SerializeToString(),
            ),
            "ListDatasets": grpc.unary_unary_rpc_method_handler(
                servicer.list_datasets,
                request_deserializer=None,
                response_serializer=lambda dss: pb.ListDatasetsResponse(
                    datasets=[dataset_info(d) for d in dss]
                ).SerializeToString(),
            ),
        },
    )
