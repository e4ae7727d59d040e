"""The worker's side of the wire: the only server module that touches `*_pb2`.

Chunks are serialized by hand: the protobuf header bytes followed by each
array's memory, so tensor data is copied once (into the message) and never
goes through a protobuf object. The result is ordinary protobuf on the wire.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from shardstream.server._lanes import TICKET_SECONDS, LaneOffer
from shardstream.server.errors import MalformedRequestError
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import ALIGNMENT, FieldSpec, dtype_code
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
    dtype of a "string" / "bytes" field comes from `schema` (its values are uint8).
    Every tensor's data (and lengths) starts at a multiple of ALIGNMENT bytes."""
    count = len(next(iter(arrays.values())))
    text = {f.name: f.dtype for f in schema if not f.shape and f.ragged}
    tensors: list[list[bytes | Region]] = []
    memory: list[memoryview] = []
    for name, column in arrays.items():
        if isinstance(column, Ragged):
            a = _little(column.values)
            lengths = column.lengths.astype("<i8", copy=False)
            tensors.append(
                [
                    _tensor_fields(name, text.get(name, a.dtype), a.shape),
                    Region(_TENSOR_DATA, a.nbytes),
                    Region(_TENSOR_LENGTHS, lengths.nbytes),  # written also when empty
                ]
            )
            memory += [a.reshape(-1).view(np.uint8).data, lengths.view(np.uint8).data]
            continue
        a = _little(column)
        tensors.append([_tensor_fields(name, a.dtype, a.shape), Region(_TENSOR_DATA, a.nbytes)])
        memory.append(a.reshape(-1).view(np.uint8).data)
    pieces = aligned_layout(_chunk_head(start, count, shard), tensors)
    data = iter(memory)
    return b"".join(p if isinstance(p, bytes) else next(data) for p in pieces)


def _chunk_head(start: int, count: int, shard: str) -> bytes:
    """A Chunk's fields before its tensors: start, count and the shard's id."""
    head = [_int_key(1), _varint(start), _int_key(2), _varint(count)]
    if shard:
        shard_b = shard.encode()
        head += [_len_key(4), _varint(len(shard_b)), shard_b]
    return b"".join(head)


# Tensor fields, from shardstream.proto.
_TENSOR_DATA, _TENSOR_LENGTHS, _TENSOR_PAD = 4, 5, 6


@dataclass(frozen=True, slots=True)
class Region:
    """A length-delimited field of a Tensor whose bytes are data placed at an aligned offset."""

    field: int
    nbytes: int


def aligned_layout(head: bytes, tensors: list[list[bytes | Region]]) -> list[bytes | Region]:
    """A `ReadResponse{chunk}` as protobuf bytes and the data regions between them.

    `head` is the Chunk's fields before its tensors; each tensor is its fixed fields
    (bytes) and Regions. Before each region's key a `pad` field is placed so that the
    region's data starts at a multiple of ALIGNMENT from the start of the message. The
    padding lengthens the messages, whose length varints can then grow and move the data
    again: the layout is redone until it is stable, in two passes nearly always. From the
    third pass on, pads only grow (so do the lengths and their varints), which makes it
    settle where a varint would otherwise flip between two widths."""
    pads: dict[tuple[int, int], int] = {}
    for attempt in range(16):
        bodies = [
            sum(
                len(p) if isinstance(p, bytes) else pads.get((t, r), 0) + _region_size(p)
                for r, p in enumerate(parts)
            )
            for t, parts in enumerate(tensors)
        ]
        size = len(head) + sum(len(_TENSOR_KEY) + len(_varint(b)) + b for b in bodies)
        first = _len_key(1) + _varint(size) + head
        out: list[bytes | Region] = [first]
        pos = len(first)
        stable = True
        for t, parts in enumerate(tensors):
            fixed = _TENSOR_KEY + _varint(bodies[t])
            for r, part in enumerate(parts):
                if isinstance(part, bytes):
                    fixed += part
                    continue
                key = _len_key(part.field) + _varint(part.nbytes)
                was = pads.get((t, r), 0)
                least = was if attempt >= 2 else 0
                pad = least + -(pos + len(fixed) + least + len(key)) % ALIGNMENT
                while _pad_field(pad) is None:
                    pad += ALIGNMENT
                stable = stable and pad == was
                pads[(t, r)] = pad
                fixed += _pad_field(pad) or b""
                out += [fixed + key, part]
                pos += len(fixed) + len(key) + part.nbytes
                fixed = b""
            if fixed:
                out.append(fixed)
                pos += len(fixed)
        if stable:
            return out
    raise AssertionError("the chunk layout did not settle")  # pragma: no cover


def _pad_field(n: int) -> bytes | None:
    """A `pad` field of exactly `n` bytes (b"" for 0), or None where none has that size."""
    if n == 0:
        return b""
    for length in (n - 2, n - 3, n - 4):
        if length >= 0 and 1 + len(_varint(length)) + length == n:
            return _PAD_KEY + _varint(length) + bytes(length)
    return None


_TENSOR_KEY = _len_key(3)
_PAD_KEY = _len_key(_TENSOR_PAD)


def _region_size(region: Region) -> int:
    return len(_len_key(region.field)) + len(_varint(region.nbytes)) + region.nbytes


def layout_chunk_into(
    buf: memoryview, start: int, count: int, schema: tuple[FieldSpec, ...], shard: str = ""
) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
    """Write a chunk's protobuf headers into `buf` and leave room for its tensors.

    Returns the chunk's size and, per schema field, a writable array over the room for
    its data (shape (count, *field.shape), little-endian): whoever fills those arrays
    completes the same bytes `encode_chunk` would produce, without an intermediate copy.
    """
    pieces = fixed_layout(start, count, schema, shard)
    total = layout_size(pieces)
    if total > len(buf):
        raise ValueError(f"a chunk of {total} bytes does not fit its buffer of {len(buf)}")
    views: dict[str, np.ndarray[Any, Any]] = {}
    fields = iter(schema)
    pos = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            buf[pos : pos + len(piece)] = piece
            pos += len(piece)
        else:
            spec = next(fields)
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            room = np.frombuffer(buf[pos : pos + piece.nbytes], dtype=dtype)
            views[spec.name] = room.reshape((count, *spec.shape))
            pos += piece.nbytes
    return total, views


def layout_size(pieces: list[bytes | Region]) -> int:
    """Bytes of the message a layout describes."""
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)


def fixed_layout(
    start: int, count: int, schema: tuple[FieldSpec, ...], shard: str = ""
) -> list[bytes | Region]:
    """A chunk of fixed fields (in schema order): its headers and each field's data region.

    The chunks of a stream differ in `start` only, so the layout is computed once per
    width of start's varint (which alone moves the offsets) and the start patched in."""
    start_b = _varint(start)
    pieces, at = _fixed_template(len(start_b), count, schema, shard)
    first = pieces[0]
    assert isinstance(first, bytes)
    return [first[:at] + start_b + first[at + len(start_b) :], *pieces[1:]]


@functools.lru_cache(maxsize=256)
def _fixed_template(
    width: int, count: int, schema: tuple[FieldSpec, ...], shard: str
) -> tuple[list[bytes | Region], int]:
    """`fixed_layout` for a start whose varint has `width` bytes, and where it lies."""
    if any(f.ragged for f in schema):
        raise ValueError("a chunk with ragged fields has no fixed layout; use encode_chunk")
    tensors: list[list[bytes | Region]] = []
    for spec in schema:
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        shape = (count, *spec.shape)
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        tensors.append([_tensor_fields(spec.name, dtype, shape), Region(_TENSOR_DATA, nbytes)])
    start = 0 if width == 1 else 1 << (7 * (width - 1))  # any start of that width
    head = _chunk_head(start, count, shard)
    pieces = aligned_layout(head, tensors)
    first = pieces[0]
    assert isinstance(first, bytes) and len(_varint(start)) == width
    return pieces, len(first) - len(head) + len(_int_key(1))


def _tensor_fields(name: str, dtype: np.dtype[Any] | str, shape: tuple[int, ...]) -> bytes:
    """A Tensor message's fields before its data: name, dtype, shape."""
    name_b = name.encode()
    dims = b"".join(_varint(d) for d in shape)
    return b"".join(
        [
            _len_key(1), _varint(len(name_b)), name_b,
            _int_key(2), _varint(dtype_code(dtype)),
            _len_key(3), _varint(len(dims)), dims,
        ]
    )  # fmt: skip


def _little(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def encode_shared(start: int, count: int, shard: str, slot: int, size: int) -> bytes:
    """A `ReadResponse{shared}`: the chunk's message is in slot `slot` of the lane."""
    shared = pb.SharedChunk(start=start, count=count, shard=shard, slot=slot, size=size)
    return pb.ReadResponse(shared=shared).SerializeToString()


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
    lane: str = ""  # the client's same-host lane (`_lanes`), if it has one
    lane_stream: int = 0  # the client's id of this read on its lane
    lane_chunk_records: int = 0  # most records per chunk in the lane (0: max_chunk_records)
    dataset_fingerprint: str = ""  # the description the client planned from; "": any


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
        lane=_bounded("lane id", r.lane, 64),
        lane_stream=r.lane_stream,
        lane_chunk_records=r.lane_chunk_records,
        dataset_fingerprint=_bounded(
            "dataset fingerprint", r.dataset_fingerprint, MAX_FINGERPRINT_BYTES
        ),
    )


def decode_describe(data: bytes) -> str:
    """The dataset name a DescribeDatasetRequest asks for, or MalformedRequestError."""
    return _bounded("dataset name", _parse(pb.DescribeDatasetRequest, data).dataset)


def decode_open_lane(data: bytes) -> tuple[int, int, bool]:
    """The slots, bytes per slot and kind (network or same-host) an OpenLaneRequest asks
    for, or MalformedRequestError."""
    request = _parse(pb.OpenLaneRequest, data)
    return int(request.slots), int(request.slot_bytes), bool(request.network)


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
        record_bytes=ds.mean_record_bytes,
    )


def _encode_offer(offer: LaneOffer) -> bytes:
    return pb.OpenLaneResponse(
        address=offer.address,
        ticket=offer.ticket,
        lane=offer.lane,
        slots=offer.slots,
        slot_bytes=offer.slot_bytes,
        ticket_seconds=TICKET_SECONDS,
        port=offer.port,
    ).SerializeToString()


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
            "OpenLane": grpc.unary_unary_rpc_method_handler(
                servicer.open_lane,
                request_deserializer=None,
                response_serializer=_encode_offer,
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
