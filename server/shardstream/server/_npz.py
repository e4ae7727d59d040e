"""The npz shard format: one array per field, first dimension = records.

Members stored uncompressed (what `np.savez` writes) are read in place: the
decoder finds where each array's data starts in the file and reads only the
requested rows. Compressed members (`np.savez_compressed`) and Fortran-order
arrays are loaded whole and sliced, with the last two such shards cached.
Pickled (object) arrays are never loaded; URL (fsspec) shards are read alike.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from numpy.lib import format as npformat

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import ShardPath, Stamp, open_shard, shard_stat
from shardstream.v1.codec import FieldSpec

__all__ = ["NpzDecoder"]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"
_MAX_OPEN = 16  # shards whose file handle and offsets an instance keeps
_MAX_LOADED = 2  # shards whose fully loaded (compressed / Fortran) arrays are kept
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError)
_MEMBER_ERRORS = (ValueError, EOFError, RuntimeError, *_ZIP_ERRORS)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Array:
    field: FieldSpec
    member: str  # name inside the zip
    dtype: np.dtype[Any]  # as stored: may be big-endian
    offset: int | None  # file offset of the row-major data; None: load the member whole


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shard:
    stamp: Stamp  # (size, mtime_ns) when parsed
    records: int
    arrays: tuple[_Array, ...]
    file: IO[bytes]


def _read_header(
    path: ShardPath, name: str, fp: IO[bytes]
) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = npformat.read_magic(fp)
    if version == (1, 0):
        return npformat.read_array_header_1_0(fp)
    if version == (2, 0):
        return npformat.read_array_header_2_0(fp)
    raise DecodeError(
        f"{path}: array {name!r} uses npy format version {version[0]}.{version[1]}; "
        "only 1.0 and 2.0 are supported (write shards with np.savez)"
    )


def _field(path: ShardPath, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> FieldSpec:
    if dtype.hasobject:
        raise DecodeError(
            f"{path}: array {name!r} holds Python objects (dtype {dtype}), which would need "
            "pickle; pickled payloads are never loaded, store numeric arrays instead"
        )
    if not shape:
        raise DecodeError(
            f"{path}: array {name!r} is 0-dimensional; every array needs a first "
            "dimension that counts the records"
        )
    try:
        return FieldSpec(name=name, dtype=dtype.name, shape=shape[1:])
    except ValueError as e:
        raise DecodeError(f"{path}: array {name!r}: {e}") from None


def _first_missing(available: int, row_bytes: int) -> int:
    return max(available, 0) // row_bytes if row_bytes else 0


def _parse(path: ShardPath, f: IO[bytes], size: int) -> tuple[int, tuple[_Array, ...]]:
    try:
        zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        raise _explain_bad_zip(path, f, size) from None
    arrays: list[_Array] = []
    records: dict[str, int] = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise DecodeError(
                    f"{path}: member {info.filename!r} is not an .npy array; an npz shard "
                    "may hold arrays only (write it with np.savez)"
                )
            name = info.filename.removesuffix(".npy")
            if name in records:
                raise DecodeError(f"{path}: array {name!r} appears twice; rewrite the shard")
            try:
                with zf.open(info) as member:
                    shape, fortran, dtype = _read_header(path, name, member)
                    header_len = member.tell()
            except _MEMBER_ERRORS as e:
                raise DecodeError(f"{path}: array {name!r} has a corrupt header: {e}") from None
            field = _field(path, name, shape, dtype)
            records[name] = shape[0]
            offset = None
            if info.compress_type == zipfile.ZIP_STORED and not (fortran and len(shape) > 1):
                f.seek(info.header_offset)
                local = f.read(_LOCAL_HEADER.size)
                if len(local) < _LOCAL_HEADER.size or local[:4] != _LOCAL_MAGIC:
                    raise DecodeError(f"{path}: array {name!r}: zip local header is corrupt")
                name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
                offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                offset += header_len
                row_bytes = field.record_bytes
                available = min(info.file_size - header_len, size - offset)
                if available < shape[0] * row_bytes:
                    first = _first_missing(available, row_bytes)
                    raise DecodeError(
                        f"{path} is truncated: array {name!r} declares {shape[0]} records "
                        f"but its data ends at record {first}",
                        record=first,
                    )
            arrays.append(_Array(field=field, member=info.filename, dtype=dtype, offset=offset))
    if not arrays:
        raise DecodeError(f"{path} holds no arrays; an npz shard needs one array per field")
    if len(set(records.values())) > 1:
        lengths = ", ".join(f"{n!r}: {r}" for n, r in records.items())
        raise DecodeError(
            f"{path}: arrays have different first dimensions ({lengths}); every array "
            "must hold one row per record"
        )
    return next(iter(records.values())), tuple(arrays)


def _explain_bad_zip(path: ShardPath, f: IO[bytes], size: int) -> DecodeError:
    """Walk the local headers of a zip without a central directory to find where it ends."""
    plain = DecodeError(
        f"{path} is not a readable npz (zip) file: it is corrupt or truncated; rewrite the shard"
    )
    pos = 0
    while pos + _LOCAL_HEADER.size <= size:
        f.seek(pos)
        local = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        magic, _, flags, method, *_, name_len, extra_len = local
        if magic != _LOCAL_MAGIC or method != zipfile.ZIP_STORED or flags & 0x08:
            return plain
        name = f.read(name_len).decode("utf-8", "replace").removesuffix(".npy")
        f.seek(pos + _LOCAL_HEADER.size + name_len + extra_len)
        try:
            shape, fortran, dtype = _read_header(path, name, f)
        except (ValueError, DecodeError):
            return plain
        if not shape:
            return plain
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        data = f.tell()
        if data + shape[0] * row_bytes > size:
            first = 0 if fortran and len(shape) > 1 else _first_missing(size - data, row_bytes)
            return DecodeError(
                f"{path} is truncated: the file ends inside array {name!r} at record "
                f"{first} of {shape[0]} (arrays after it, if any, are lost); rewrite the shard",
                record=first,
            )
        pos = data + shape[0] * row_bytes
    return plain


def _check_range(path: ShardPath, start: int, count: int, records: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"`start` and `count` must be non-negative, got {start} and {count}")
    if start + count > records:
        first = max(start, records)
        raise DecodeError(
            f"{path} has {records} records, cannot read [{start}, {start + count}); "
            "did the shard change since it was indexed?",
            record=first,
        )


@register_decoder
class NpzDecoder(Decoder):
    """Decoder of `.npz` shards written by `np.savez` (or `np.savez_compressed`)."""

    name = "npz"
    suffixes = (".npz",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shards: OrderedDict[ShardPath, _Shard] = OrderedDict()
        self._loaded: OrderedDict[ShardPath, tuple[Stamp, dict[str, np.ndarray[Any, Any]]]]
        self._loaded = OrderedDict()

    def index(self, path: ShardPath) -> ShardMeta:
        with self._lock:
            shard = self._shard(path)
            return ShardMeta(records=shard.records, schema=tuple(a.field for a in shard.arrays))

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        with self._lock:
            shard = self._shard(path)
            _check_range(path, start, count, shard.records)
            out: dict[str, np.ndarray[Any, Any]] = {}
            for array in shard.arrays:
                # Each result is a fresh, C-contiguous, little-endian array the caller owns.
                little = array.dtype.newbyteorder("<")
                if array.offset is None:
                    rows = self._load(path, shard, array)[start : start + count]
                    rows = np.array(rows, dtype=little, order="C")
                else:
                    rows = _read_rows(path, shard, array, start, count)
                    if rows.dtype != little:
                        rows = rows.astype(little)
                out[array.field.name] = rows
            return out

    def read_into(
        self,
        path: ShardPath,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
        schema: tuple[FieldSpec, ...],
    ) -> None:
        """Stored (uncompressed) little-endian members are read from the file straight
        into `out`; anything else goes through `read`. A subclass that changes `read`
        (e.g. adds a transform) keeps its own semantics: it is always used then."""
        if type(self).read is not NpzDecoder.read:
            super().read_into(path, start, count, out, schema)
            return
        self.read_stored_into(path, start, count, out)

    def read_stored_into(
        self, path: ShardPath, start: int, count: int, out: Mapping[str, np.ndarray[Any, Any]]
    ) -> None:
        """The shard's own records into `out` (for subclasses that transform in place)."""
        with self._lock:
            shard = self._shard(path)
            _check_range(path, start, count, shard.records)
            for array in shard.arrays:
                target = out[array.field.name]
                if array.offset is not None and array.dtype == target.dtype:
                    _read_rows_into(path, shard, array, start, target)
                elif array.offset is not None:
                    target[...] = _read_rows(path, shard, array, start, count)
                else:
                    target[...] = self._load(path, shard, array)[start : start + count]

    def close(self) -> None:
        """Close the cached file handles and drop the cached arrays."""
        with self._lock:
            while self._shards:
                self._shards.popitem()[1].file.close()
            self._loaded.clear()

    def __del__(self) -> None:
        if hasattr(self, "_shards"):
            self.close()

    def _shard(self, path: ShardPath) -> _Shard:
        stamp = shard_stat(path)
        cached = self._shards.get(path)
        if cached is not None:
            if cached.stamp == stamp:
                self._shards.move_to_end(path)
                return cached
            del self._shards[path]
            cached.file.close()
        local = isinstance(path, Path)  # kept open in the cache; local files unbuffered:
        f = open(path, "rb", buffering=0) if local else open_shard(path)  # noqa: SIM115
        try:
            if local:
                st = os.fstat(f.fileno())
                stamp = (st.st_size, st.st_mtime_ns)
            records, arrays = _parse(path, f, stamp[0])
        except BaseException:
            f.close()
            raise
        shard = _Shard(stamp=stamp, records=records, arrays=arrays, file=f)
        self._shards[path] = shard
        while len(self._shards) > _MAX_OPEN:
            self._shards.popitem(last=False)[1].file.close()
        return shard

    def _load(self, path: ShardPath, shard: _Shard, array: _Array) -> np.ndarray[Any, Any]:
        stamp, arrays = self._loaded.get(path, (None, {}))
        if stamp != shard.stamp:
            arrays = {}
            self._loaded[path] = (shard.stamp, arrays)
        self._loaded.move_to_end(path)
        while len(self._loaded) > _MAX_LOADED:
            self._loaded.popitem(last=False)
        if array.field.name not in arrays:
            try:
                with zipfile.ZipFile(shard.file) as zf, zf.open(array.member) as member:
                    arrays[array.field.name] = npformat.read_array(member, allow_pickle=False)
            except _MEMBER_ERRORS as e:
                raise DecodeError(f"{path}: array {array.field.name!r} is corrupt: {e}") from None
        return arrays[array.field.name]


def _read_rows(
    path: ShardPath, shard: _Shard, array: _Array, start: int, count: int
) -> np.ndarray[Any, Any]:
    out = np.empty((count, *array.field.shape), dtype=array.dtype)
    _read_rows_into(path, shard, array, start, out)
    return out


def _read_rows_into(
    path: ShardPath, shard: _Shard, array: _Array, start: int, out: np.ndarray[Any, Any]
) -> None:
    """Read rows [start, start + len(out)) of a stored member into `out` (any writable,
    C-contiguous array of the member's dtype)."""
    assert array.offset is not None
    row_bytes = array.field.record_bytes
    if out.nbytes == 0:
        return
    begin = array.offset + start * row_bytes
    if begin + out.nbytes > shard.stamp[0]:
        first = start + _first_missing(shard.stamp[0] - begin, row_bytes)
        raise DecodeError(f"{path} is truncated at record {first}", record=first)
    flat = out.reshape(-1).view(np.uint8).data  # a writable memoryview of `out`
    shard.file.seek(begin)
    done = 0
    while done < flat.nbytes:
        n = cast(Any, shard.file).readinto(flat[done:])  # FileIO, or an fsspec file
        if not n:
            first = start + done // row_bytes
            raise DecodeError(f"{path} was truncated while reading record {first}", record=first)
        done += n
