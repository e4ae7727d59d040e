"""Tensor and schema conventions of the wire, shared by worker and client.

Only plain Python and numpy here: the enum values are the ones in
`shardstream.proto` (checked by a test against the generated module), so that
code outside the two `_wire` modules never touches generated classes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# numpy dtype (little-endian) <-> shardstream.v1.DType value.
_DTYPE_CODES: dict[str, int] = {
    "bool": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "uint8": 6,
    "uint16": 7,
    "uint32": 8,
    "uint64": 9,
    "float16": 10,
    "float32": 11,
    "float64": 12,
}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPE_CODES)  # numeric: numpy dtypes

# Text dtypes: one UTF-8 string / one byte string per record. They travel as ragged
# uint8 values plus per-record lengths (see `Ragged`), and are always ragged.
TEXT_DTYPES: tuple[str, ...] = ("string", "bytes")
_TEXT_CODES: dict[str, int] = {"string": 13, "bytes": 14}

_CODE_NAMES: dict[int, str] = {code: name for name, code in {**_DTYPE_CODES, **_TEXT_CODES}.items()}
_CODE_DTYPES: dict[int, np.dtype[Any]] = {
    code: np.dtype("uint8" if name in TEXT_DTYPES else name).newbyteorder("<")
    for code, name in _CODE_NAMES.items()
}
_ALL = ", ".join((*SUPPORTED_DTYPES, *TEXT_DTYPES))


def dtype_code(dtype: np.dtype[Any] | str) -> int:
    """The wire enum value of a numpy dtype or of a text dtype ("string", "bytes");
    ValueError for unsupported ones."""
    if isinstance(dtype, str) and dtype in _TEXT_CODES:
        return _TEXT_CODES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} cannot travel on the wire; supported: {_ALL}") from None
    code = _DTYPE_CODES.get(dt.name)
    if code is None:
        raise ValueError(f"dtype {dt} cannot travel on the wire; supported: {_ALL}")
    return code


def dtype_name(code: int) -> str:
    """The dtype name ("int32", "string", ...) of a wire enum value; ValueError if unknown."""
    try:
        return _CODE_NAMES[code]
    except KeyError:
        raise ValueError(f"unknown wire dtype code {code}") from None


def dtype_from_code(code: int) -> np.dtype[Any]:
    """The little-endian numpy dtype a wire enum value's data is read as (uint8 for the
    text dtypes); ValueError if unknown."""
    try:
        return _CODE_DTYPES[code]
    except KeyError:
        raise ValueError(f"unknown wire dtype code {code}") from None


def storage_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype a field's values are held in (uint8 for "string" and "bytes")."""
    return np.dtype("uint8" if name in TEXT_DTYPES else name)


RAGGED = -1  # a ragged field's first dimension in its shape: it varies from record to record


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a record: its name, element dtype and per-record shape.

    A *ragged* field has a variable first dimension, written -1 (`RAGGED`): `tokens`
    int32 (-1,) holds any number of int32 per record, `boxes` float32 (-1, 4) any
    number of 4-vectors. "string" and "bytes" fields (shape ()) hold one UTF-8 string or
    one byte string per record and are ragged too (uint8 values on the wire)."""

    name: str
    dtype: str  # numpy dtype name, e.g. "uint8", or "string" / "bytes"
    shape: tuple[int, ...]  # shape of one record's value; () for a scalar; -1 first: ragged

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("field name must be non-empty")
        dtype_code(self.dtype)  # validates
        if self.dtype in TEXT_DTYPES and self.shape != ():
            raise ValueError(
                f"field {self.name!r}: a {self.dtype} field holds one value per record, its "
                f"shape must be (), got {self.shape}"
            )
        if any(d < 0 for d in self.inner) or (self.shape and self.shape[0] < RAGGED):
            raise ValueError(
                f"field {self.name!r}: shape must be non-negative but for a first dimension "
                f"of -1 (ragged), got {self.shape}"
            )

    @property
    def ragged(self) -> bool:
        """Whether a record's value has a variable first dimension (or is text)."""
        return self.dtype in TEXT_DTYPES or self.shape[:1] == (RAGGED,)

    @property
    def inner(self) -> tuple[int, ...]:
        """The shape of one item of a ragged field (the dims after the first); the
        shape of a fixed field."""
        return self.shape[1:] if self.shape[:1] == (RAGGED,) else self.shape

    @property
    def item_bytes(self) -> int:
        """Bytes one item of a ragged field takes (one record's value, if fixed)."""
        return int(storage_dtype(self.dtype).itemsize) * math.prod(int(d) for d in self.inner)

    @property
    def record_bytes(self) -> int:
        """Bytes one record's value takes; for a ragged field, the least it takes (its
        length on the wire: 8 bytes)."""
        return LENGTH_BYTES if self.ragged else self.item_bytes

    def __str__(self) -> str:
        if self.dtype in TEXT_DTYPES:
            return f"{self.name}:{self.dtype}"
        dims = "x".join("*" if d == RAGGED else str(d) for d in self.shape) or "scalar"
        return f"{self.name}:{self.dtype}[{dims}]"


LENGTH_BYTES = 8  # a ragged record's length on the wire (sfixed64)
# Bytes a ragged field's record is assumed to take where no better estimate is at hand
# (the client sizing its reads); chunks are sized from the actual bytes.
RAGGED_RECORD_GUESS = 1024


def estimated_record_bytes(schema: tuple[FieldSpec, ...], ragged_bytes: int = 0) -> int:
    """Bytes a record takes over all fields, a ragged field's value counted as
    `ragged_bytes` (default `RAGGED_RECORD_GUESS`)."""
    guess = ragged_bytes or RAGGED_RECORD_GUESS
    return sum(f.record_bytes + (guess if f.ragged else 0) for f in schema)


def is_ragged(schema: tuple[FieldSpec, ...]) -> bool:
    return any(f.ragged for f in schema)


# Bytes a chunk message needs beyond its tensor data and its shard id: tags, lengths,
# names, shapes (a bound both sides size messages with).
CHUNK_OVERHEAD = 1024
# Tensor data (and a ragged field's lengths) starts at a multiple of ALIGNMENT bytes from
# the start of the message: a `Tensor.pad` field before it takes up to ALIGNMENT + 1 bytes.
ALIGNMENT = 64
PAD_BYTES = ALIGNMENT + 1


def chunk_overhead(schema: tuple[FieldSpec, ...], shard_id_bytes: int) -> int:
    """Bytes a chunk of `schema` needs beyond its records' data: headers, the shard id
    and the alignment padding of every field's data and lengths (a bound)."""
    names = sum(len(f.name.encode()) for f in schema)
    return CHUNK_OVERHEAD + shard_id_bytes + names + 2 * PAD_BYTES * len(schema)


def chunk_limit(schema: tuple[FieldSpec, ...], shard_id_bytes: int, max_message_bytes: int) -> int:
    """Most records one chunk message of `max_message_bytes` can hold (0: not even one)."""
    room = max_message_bytes - chunk_overhead(schema, shard_id_bytes)
    return max(0, room) // max(1, record_bytes(schema))


def record_bytes(schema: tuple[FieldSpec, ...]) -> int:
    """Bytes one record takes over all fields of a schema (at least, if ragged).
    Remembered per schema: workers ask it for every chunk."""
    return _record_bytes(tuple(schema))


@functools.lru_cache(maxsize=1024)
def _record_bytes(schema: tuple[FieldSpec, ...]) -> int:
    return sum(f.record_bytes for f in schema)


def spec_of(name: str, array: np.ndarray[Any, Any]) -> FieldSpec:
    """The FieldSpec of a batch array (first dimension = records)."""
    return FieldSpec(
        name=name, dtype=array.dtype.name, shape=tuple(int(d) for d in array.shape[1:])
    )
