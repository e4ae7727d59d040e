"""Tensor and schema conventions of the wire, shared by worker and client.

Only plain Python and numpy here: the enum values are the ones in
`shardstream.proto` (checked by a test against the generated module), so that
code outside the two `_wire` modules never touches generated classes.
"""

from __future__ import annotations

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
_CODE_DTYPES: dict[int, np.dtype[Any]] = {
    code: np.dtype(name).newbyteorder("<") for name, code in _DTYPE_CODES.items()
}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPE_CODES)


def dtype_code(dtype: np.dtype[Any] | str) -> int:
    """The wire enum value of a numpy dtype; ValueError for unsupported ones."""
    dt = np.dtype(dtype)
    code = _DTYPE_CODES.get(dt.name)
    if code is None:
        raise ValueError(
            f"dtype {dt} cannot travel on the wire; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    return code


def dtype_from_code(code: int) -> np.dtype[Any]:
    """The little-endian numpy dtype of a wire enum value; ValueError if unknown."""
    try:
        return _CODE_DTYPES[code]
    except KeyError:
        raise ValueError(f"unknown wire dtype code {code}") from None


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a record: its name, element dtype and per-record shape."""

    name: str
    dtype: str  # numpy dtype name, e.g. "uint8"
    shape: tuple[int, ...]  # shape of one record's value; () for a scalar

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("field name must be non-empty")
        dtype_code(self.dtype)  # validates
        if any(d < 0 for d in self.shape):
            raise ValueError(f"field {self.name!r}: shape must be non-negative, got {self.shape}")

    @property
    def record_bytes(self) -> int:
        """Bytes one record's value takes."""
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.shape) or "scalar"
        return f"{self.name}:{self.dtype}[{dims}]"


# Bytes a chunk message needs beyond its tensor data and its shard id: tags, lengths,
# names, shapes (a bound both sides size messages with).
CHUNK_OVERHEAD = 1024


def chunk_limit(schema: tuple[FieldSpec, ...], shard_id_bytes: int, max_message_bytes: int) -> int:
    """Most records one chunk message of `max_message_bytes` can hold (0: not even one)."""
    room = max_message_bytes - CHUNK_OVERHEAD - shard_id_bytes
    return max(0, room) // max(1, record_bytes(schema))


def record_bytes(schema: tuple[FieldSpec, ...]) -> int:
    """Bytes one record takes over all fields of a schema."""
    return sum(f.record_bytes for f in schema)


def spec_of(name: str, array: np.ndarray[Any, Any]) -> FieldSpec:
    """The FieldSpec of a batch array (first dimension = records)."""
    return FieldSpec(
        name=name, dtype=array.dtype.name, shape=tuple(int(d) for d in array.shape[1:])
    )
