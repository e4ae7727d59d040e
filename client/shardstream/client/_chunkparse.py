"""Zero-copy parsing of `ReadResponse{chunk}` messages.

A generic protobuf parser copies every `bytes` field (once into its arena,
again into a Python object). Tensor data is nearly all of a chunk, so this
parser walks the wire format itself and returns numpy arrays that are views
of the received message (`numpy.frombuffer`): no copy at all. It accepts any
valid encoding of the message (field order, packed or unpacked shapes and
lengths, unknown fields); anything else is a `ValueError`. A tensor with
`lengths` (a ragged field) becomes a `Ragged` over the values, its lengths
checked: one per record, none negative, adding up to the values' first
dimension.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from shardstream.v1.codec import TEXT_DTYPES, dtype_from_code, dtype_name
from shardstream.v1.ragged import Ragged

# Field numbers, from shardstream.proto.
_RESPONSE_CHUNK = 1
_CHUNK_START, _CHUNK_COUNT, _CHUNK_TENSORS, _CHUNK_SHARD = 1, 2, 3, 4
_TENSOR_NAME, _TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_DATA, _TENSOR_LENGTHS = 1, 2, 3, 4, 5


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # one byte: tags, dtypes, most dimensions
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, pos: int, end: int) -> Any:
    """(field number, wire type, value or (start, stop) of a length-delimited field)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError(f"field {field} runs past the end of its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire == 1:
            if pos + 8 > end:
                raise ValueError(f"field {field} runs past the end of its message")
            yield field, wire, int.from_bytes(buf[pos : pos + 8], "little", signed=True)
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past the end of its message")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def is_chunk(data: bytes | np.ndarray[Any, Any]) -> bool:
    """Whether a ReadResponse holds a chunk (its first field is field 1)."""
    return len(data) > 0 and data[0] == (_RESPONSE_CHUNK << 3 | 2)


def parse_chunk(data: bytes | np.ndarray[Any, Any]) -> tuple[int, int, str, dict[str, Any]]:
    """(start, count, shard, arrays) of a serialized `ReadResponse{chunk}` (bytes, or a
    uint8 array: a same-host lane's slot); arrays view `data`. Two tensors of one name
    are refused (a protobuf map would keep the last)."""
    buf: Any = data if type(data) is bytes else memoryview(cast(Any, data))  # bytes: fastest
    chunk: tuple[int, int] | None = None
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == _RESPONSE_CHUNK and wire == 2:
            chunk = value  # last one wins, as in protobuf
    if chunk is None:
        raise ValueError("not a chunk")
    start = count = 0
    shard = ""
    tensors = []
    for field, wire, value in _fields(buf, *chunk):
        if field == _CHUNK_START and wire == 0:
            start = _signed(value)
        elif field == _CHUNK_COUNT and wire == 0:
            count = _signed(value)
        elif field == _CHUNK_TENSORS and wire == 2:
            tensors.append(value)
        elif field == _CHUNK_SHARD and wire == 2:
            shard = _text(buf, value, "the chunk's shard id")
    arrays: dict[str, Any] = {}
    for span in tensors:
        name, array = _tensor(data, buf, span)
        if isinstance(array, Ragged):
            if len(array) != count:
                raise ValueError(
                    f"tensor {name!r} has lengths for {len(array)} records in a chunk of {count}"
                )
        elif not array.ndim or array.shape[0] != count:
            raise ValueError(f"tensor {name!r} has shape {array.shape} in a chunk of {count}")
        if name in arrays:
            raise ValueError(f"two tensors are named {name!r}")
        arrays[name] = array
    return start, count, shard, arrays


def _text(buf: Any, span: tuple[int, int], what: str) -> str:
    try:
        return bytes(buf[span[0] : span[1]]).decode()
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None


def _tensor(
    data: bytes | np.ndarray[Any, Any], buf: Any, span: tuple[int, int]
) -> tuple[str, np.ndarray[Any, Any] | Ragged]:
    name = ""
    code = 0
    shape: list[int] = []
    payload = (0, 0)
    lengths: list[tuple[int, int] | int] = []  # spans of packed runs, or unpacked values
    has_lengths = False
    for field, wire, value in _fields(buf, *span):
        if field == _TENSOR_NAME and wire == 2:
            name = _text(buf, value, "a tensor name")
        elif field == _TENSOR_DTYPE and wire == 0:
            code = value
        elif field == _TENSOR_SHAPE and wire == 2:  # packed
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos, stop)
                shape.append(_signed(dim))
        elif field == _TENSOR_SHAPE and wire == 0:
            shape.append(_signed(value))
        elif field == _TENSOR_DATA and wire == 2:
            payload = value
        elif field == _TENSOR_LENGTHS and wire in (1, 2):
            lengths.append(value)
            has_lengths = True
    try:
        dtype = dtype_from_code(code)
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r} has a negative dimension in {tuple(shape)}")
    nbytes = payload[1] - payload[0]
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise ValueError(
            f"tensor {name!r}: {nbytes} bytes, shape {tuple(shape)} of {dtype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=payload[0])
    array = array.reshape(shape)
    if not has_lengths:
        if dtype_name(code) in TEXT_DTYPES:
            raise ValueError(f"tensor {name!r} holds {dtype_name(code)} values but no lengths")
        return name, array
    try:
        return name, Ragged.from_lengths(array, _lengths(data, lengths))
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None


def _lengths(
    data: bytes | np.ndarray[Any, Any], parts: list[tuple[int, int] | int]
) -> np.ndarray[Any, Any]:
    """A ragged tensor's lengths: packed sfixed64 viewed without a copy where there is
    one packed run (as a worker writes them), gathered in order otherwise."""
    runs = []
    for part in parts:
        if isinstance(part, int):
            runs.append(np.array([part], "<i8"))
            continue
        start, stop = part
        if (stop - start) % 8:
            raise ValueError(f"packed lengths of {stop - start} bytes, not sfixed64")
        runs.append(np.frombuffer(data, "<i8", count=(stop - start) // 8, offset=start))
    return runs[0] if len(runs) == 1 else np.concatenate(runs)
