"""The npz shard format: one array per field, first dimension = records.

Members stored uncompressed (what `np.savez` writes) are read in place: the
decoder finds where each array's data starts in the file and reads only the
requested rows. Deflated members (`np.savez_compressed`) are read as streams
(`_inflate`): a read inflates and discards up to its first row, then inflates
its rows straight into the result, a step at a time; where it stopped is kept,
so the next chunk continues from there. Indexing inflates each deflated member
once the same way, to check its CRC-32: a corrupt one is refused at start-up.
Fortran-order arrays are loaded whole, up to the read budget, and kept while
they fit in it.

Sizes are checked against the file when a shard is indexed, before anything is
allocated: a member must hold exactly what its header declares (records x
dtype x shape), a deflated member may not declare more than
`SHARDSTREAM_MAX_COMPRESSION_RATIO` times its compressed size, and a
Fortran-order array must fit `SHARDSTREAM_READ_BUDGET_BYTES` (see `_limits`).
Arrays of anything but numbers (pickled objects, strings, bytes, structured
records) are refused; URL (fsspec) shards are read alike.
"""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from numpy.lib import format as npformat

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import (
    ShardPath,
    Stamp,
    check_opened,
    local_file,
    open_shard,
    shard_stat,
    stat_stamp,
)
from shardstream.server._inflate import Deflated, InflateError, Positions, inflate_into
from shardstream.server._limits import (
    MAX_COMPRESSION_RATIO_ENV,
    READ_BUDGET_ENV,
    max_compression_ratio,
    read_budget,
)
from shardstream.v1.codec import SUPPORTED_DTYPES, FieldSpec

__all__ = ["NpzDecoder"]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"
_MAX_OPEN = 16  # shards whose file handle and offsets an instance keeps
_MAX_POSITIONS = 16  # where reads of deflated members stopped (~50-120 KiB each)
_MAX_STEP = 1 << 20  # most bytes inflated at once (less when the read budget is smaller)
_HEADER_BYTES = 16 * 1024  # an npy header is read from the first bytes of a member
_RATIO_SLACK = 1024  # bytes a deflated member may declare beyond ratio x compressed size
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError)
_MEMBER_ERRORS = (ValueError, EOFError, RuntimeError, *_ZIP_ERRORS)
_NOT_NUMBERS = {"U": "strings", "S": "bytes", "V": "structured records"}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Array:
    field: FieldSpec
    member: str  # name inside the zip
    dtype: np.dtype[Any]  # as stored: may be big-endian
    row_bytes: int
    data: int  # where row 0 starts: a file offset (stored), or in the inflated member
    deflated: Deflated | None  # the member's compressed bytes; None: stored
    fortran: bool  # Fortran order with 2+ dimensions: rows are not contiguous


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shard:
    stamp: Stamp  # `shard_stat` when parsed: size first
    records: int
    arrays: tuple[_Array, ...]
    file: IO[bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    ratio: int  # most bytes a deflated member may declare per compressed byte
    budget: int  # most bytes of a Fortran-order array (loaded whole)


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
    if dtype.kind in _NOT_NUMBERS:
        raise DecodeError(
            f"{path}: array {name!r} holds {_NOT_NUMBERS[dtype.kind]} (dtype {dtype.str}), "
            f"which cannot be a tensor field; store numbers ({', '.join(SUPPORTED_DTYPES)}), "
            "e.g. strings as integer ids"
        )
    if not shape:
        raise DecodeError(
            f"{path}: array {name!r} is 0-dimensional; every array needs a first "
            "dimension that counts the records"
        )
    try:
        return FieldSpec(name=name, dtype=dtype.name, shape=shape[1:])
    except (ValueError, TypeError) as e:
        raise DecodeError(f"{path}: array {name!r}: {e}") from None


def _first_missing(available: int, row_bytes: int) -> int:
    return max(available, 0) // row_bytes if row_bytes else 0


def _parse(
    path: ShardPath, f: IO[bytes], size: int, limits: _Limits
) -> tuple[int, tuple[_Array, ...]]:
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
            records[name], array = _member(path, f, size, info, name, limits)
            arrays.append(array)
    if not arrays:
        raise DecodeError(f"{path} holds no arrays; an npz shard needs one array per field")
    if len(set(records.values())) > 1:
        lengths = ", ".join(f"{n!r}: {r}" for n, r in records.items())
        raise DecodeError(
            f"{path}: arrays have different first dimensions ({lengths}); every array "
            "must hold one row per record"
        )
    return next(iter(records.values())), tuple(arrays)


def _member(
    path: ShardPath, f: IO[bytes], size: int, info: zipfile.ZipInfo, name: str, limits: _Limits
) -> tuple[int, _Array]:
    """An array's record count and where its rows lie, its sizes checked against the file."""
    where = f"{path}: array {name!r}"
    if info.flag_bits & 0x1:
        raise DecodeError(f"{where} is encrypted; npz shards cannot be")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DecodeError(
            f"{where} is compressed with method {info.compress_type}; only stored and deflated "
            "members are read (write shards with np.savez or np.savez_compressed)"
        )
    deflated = info.compress_type == zipfile.ZIP_DEFLATED
    if deflated and info.file_size > limits.ratio * info.compress_size + _RATIO_SLACK:
        raise DecodeError(
            f"{where} declares {info.file_size} bytes compressed into {info.compress_size}: "
            f"a compression ratio of {info.file_size // max(1, info.compress_size)}, more than "
            f"{limits.ratio} ({MAX_COMPRESSION_RATIO_ENV}); refusing a likely decompression bomb"
        )
    if not deflated and info.compress_size != info.file_size:
        raise DecodeError(f"{where}: its zip entry is corrupt (stored sizes differ)")
    f.seek(info.header_offset)
    local = f.read(_LOCAL_HEADER.size)
    if len(local) < _LOCAL_HEADER.size or local[:4] != _LOCAL_MAGIC:
        raise DecodeError(f"{where}: zip local header is corrupt")
    name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    stream = Deflated(offset=start, size=info.compress_size, inflated=info.file_size, crc=info.CRC)
    if deflated and start + info.compress_size > size:
        raise DecodeError(f"{path} is truncated: the file ends inside array {name!r}")
    try:
        n = min(info.file_size, _HEADER_BYTES)
        if deflated:
            head = bytearray(n)
            _inflate_all(f, stream, 0, memoryview(head), n)
        else:
            f.seek(start)
            head = bytearray(f.read(n))
        fp = io.BytesIO(head)
        shape, fortran, dtype = _read_header(path, name, fp)
        header_len = fp.tell()
    except InflateError as e:  # a member so small that its header is all of it
        raise DecodeError(f"{where} is corrupt: {e}") from None
    except _MEMBER_ERRORS as e:
        raise DecodeError(f"{where} has a corrupt header: {e}") from None
    field = _field(path, name, shape, dtype)
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    declared = shape[0] * row_bytes
    held = info.file_size - header_len
    in_file = held if deflated else min(held, size - start - header_len)
    if in_file < declared:
        first = _first_missing(in_file, row_bytes)
        cut = f"{path} is truncated: array" if in_file < held else f"{path}: array"
        raise DecodeError(
            f"{cut} {name!r} declares {shape[0]} records but its data ends at record {first} "
            f"({in_file} of {declared} bytes)",
            record=first,
        )
    if held > declared:
        raise DecodeError(
            f"{where} declares {shape[0]} records ({declared} bytes) but its zip member holds "
            f"{held} bytes of data; rewrite the shard"
        )
    fortran = fortran and len(shape) > 1
    if fortran and declared > limits.budget:
        raise DecodeError(
            f"{where} is in Fortran order and takes {declared} bytes, more than a read may "
            f"hold ({limits.budget}, {READ_BUDGET_ENV}): its rows are not contiguous, so it "
            "would be loaded whole; write it in C order (np.ascontiguousarray)"
        )
    array = _Array(
        field=field,
        member=info.filename,
        dtype=dtype,
        row_bytes=row_bytes,
        data=header_len if deflated else start + header_len,
        deflated=stream if deflated else None,
        fortran=fortran,
    )
    return shape[0], array


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
        row_bytes = dtype.itemsize * math.prod(shape[1:])
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
        self._limits = _Limits(ratio=max_compression_ratio(), budget=read_budget())
        self._step = min(self._limits.budget, _MAX_STEP)
        self._lock = threading.Lock()
        self._shards: OrderedDict[ShardPath, _Shard] = OrderedDict()
        self._positions = Positions(_MAX_POSITIONS)
        # Fortran-order arrays loaded whole, at most the read budget's worth.
        self._loaded: OrderedDict[Hashable, np.ndarray[Any, Any]] = OrderedDict()

    def index(self, path: ShardPath) -> ShardMeta:
        with self._lock:
            shard = self._shard(path)
            for array in shard.arrays:
                if array.deflated is not None:  # reads then trust it while its stamp holds
                    self._check_whole(path, shard, array, array.deflated)
            return ShardMeta(records=shard.records, schema=tuple(a.field for a in shard.arrays))

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        with self._lock:
            shard = self._shard(path)
            _check_range(path, start, count, shard.records)
            out: dict[str, np.ndarray[Any, Any]] = {}
            for array in shard.arrays:
                # Each result is a fresh, C-contiguous, little-endian array the caller owns.
                rows = np.empty((count, *array.field.shape), dtype=array.dtype)
                self._rows_into(path, shard, array, start, rows)
                little = array.dtype.newbyteorder("<")
                out[array.field.name] = rows if rows.dtype == little else rows.astype(little)
            return out

    def read_into(
        self,
        path: ShardPath,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
        schema: tuple[FieldSpec, ...],
    ) -> None:
        """Little-endian members are read (stored) or inflated (deflated) straight into
        `out`; big-endian ones through a copy. A subclass that changes `read` (e.g. adds
        a transform) keeps its own semantics: it is always used then."""
        if type(self).read is not NpzDecoder.read:
            super().read_into(path, start, count, out, schema)
            return
        self.read_stored_into(path, start, count, out)

    def byte_ranges(
        self, path: ShardPath, start: int, count: int
    ) -> Mapping[str, tuple[int, int]] | None:
        """The rows' file ranges, where every member of a local shard is stored (not
        deflated), little-endian and in C order; None otherwise, and for a subclass that
        changes `read` or `read_into` (it transforms: its records are not the file's)."""
        cls = type(self)
        if cls.read is not NpzDecoder.read or cls.read_into is not NpzDecoder.read_into:
            return None
        return self.stored_ranges(path, start, count)

    def stored_ranges(
        self, path: ShardPath, start: int, count: int
    ) -> dict[str, tuple[int, int]] | None:
        """`byte_ranges` of the shard's own records (for subclasses that transform only
        sometimes)."""
        if not isinstance(path, Path):
            return None
        with self._lock:
            shard = self._shard(path)
            _check_range(path, start, count, shard.records)
            ranges = {}
            for a in shard.arrays:
                begin, nbytes = a.data + start * a.row_bytes, count * a.row_bytes
                stored = a.deflated is None and not a.fortran and a.dtype.byteorder != ">"
                if not stored or begin + nbytes > shard.stamp[0]:  # truncated: decode, to say so
                    return None
                ranges[a.field.name] = (begin, nbytes)
            return ranges

    def read_stored_into(
        self, path: ShardPath, start: int, count: int, out: Mapping[str, np.ndarray[Any, Any]]
    ) -> None:
        """The shard's own records into `out` (for subclasses that transform in place)."""
        with self._lock:
            shard = self._shard(path)
            _check_range(path, start, count, shard.records)
            for array in shard.arrays:
                target = out[array.field.name]
                if array.dtype == target.dtype:
                    self._rows_into(path, shard, array, start, target)
                else:
                    rows = np.empty((count, *array.field.shape), dtype=array.dtype)
                    self._rows_into(path, shard, array, start, rows)
                    target[...] = rows

    def close(self) -> None:
        """Close the cached file handles and drop what is kept of the shards."""
        with self._lock:
            while self._shards:
                self._shards.popitem()[1].file.close()
            self._positions.clear()
            self._loaded.clear()

    def __del__(self) -> None:
        if hasattr(self, "_shards"):
            self.close()

    def _shard(self, path: ShardPath) -> _Shard:
        stamp = shard_stat(path)
        cached = self._shards.get(path)
        if cached is not None:
            if cached.stamp == stamp:
                check_opened(path, cached.stamp)  # a read pinned to another file: refused
                self._shards.move_to_end(path)
                return cached
            del self._shards[path]
            cached.file.close()
        local = local_file(path)  # kept open in the cache; local files unbuffered:
        f = open(local, "rb", buffering=0) if local is not None else open_shard(path)  # noqa: SIM115
        try:
            if local is not None:  # the stamp of the very file opened
                stamp = stat_stamp(os.fstat(f.fileno()))
                check_opened(path, stamp)
            records, arrays = _parse(path, f, stamp[0], self._limits)
        except BaseException:
            f.close()
            raise
        shard = _Shard(stamp=stamp, records=records, arrays=arrays, file=f)
        self._shards[path] = shard
        while len(self._shards) > _MAX_OPEN:
            self._shards.popitem(last=False)[1].file.close()
        return shard

    def _rows_into(
        self, path: ShardPath, shard: _Shard, array: _Array, start: int, out: np.ndarray[Any, Any]
    ) -> None:
        """Rows [start, start + len(out)) of an array into `out` (C-contiguous, writable,
        of the array's dtype as stored)."""
        if out.nbytes == 0:
            return
        if array.fortran:
            out[...] = self._whole(path, shard, array)[start : start + len(out)]
            return
        flat = out.reshape(-1).view(np.uint8).data  # a writable memoryview of `out`
        begin = array.data + start * array.row_bytes
        if array.deflated is None:
            _read_at(path, shard, begin, flat, start, array.row_bytes)
            return
        key = (path, shard.stamp, array.member)
        stream, positions = array.deflated, self._positions
        try:
            inflate_into(
                shard.file, stream, begin, flat, positions=positions, key=key, step=self._step
            )
        except InflateError as e:
            record = start
            if e.at is not None:
                record += _first_missing(e.at - begin, array.row_bytes)
            raise DecodeError(
                f"{path}: array {array.field.name!r}, record {record}: {e}", record=record
            ) from None

    def _check_whole(self, path: ShardPath, shard: _Shard, array: _Array, stream: Deflated) -> None:
        """Inflate a member to its end (discarding, a step at a time): it must inflate to
        what it declares, with the CRC-32 it declares."""
        try:
            _inflate_all(shard.file, stream, stream.inflated, memoryview(b""), self._step)
        except InflateError as e:
            record, at = None, ""
            if e.at is not None and not array.fortran:
                record = min(_first_missing(e.at - array.data, array.row_bytes), shard.records)
                at = f" at record {record}"
            name = array.field.name
            raise DecodeError(
                f"{path}: array {name!r} is corrupt{at}: {e}", record=record
            ) from None

    def _whole(self, path: ShardPath, shard: _Shard, array: _Array) -> np.ndarray[Any, Any]:
        """A Fortran-order array, loaded whole (its size was checked against the budget)."""
        key = (path, shard.stamp, array.member)
        found = self._loaded.get(key)
        if found is not None:
            self._loaded.move_to_end(key)
            return found
        raw = np.empty(shard.records * array.row_bytes, np.uint8)
        if array.deflated is None:
            _read_at(path, shard, array.data, raw.data, 0, array.row_bytes)
        else:
            try:
                _inflate_all(shard.file, array.deflated, array.data, raw.data, self._step)
            except InflateError as e:
                raise DecodeError(f"{path}: array {array.field.name!r}: {e}") from None
        shape = (shard.records, *array.field.shape)
        whole = np.ndarray(shape, dtype=array.dtype, buffer=raw, order="F")
        self._loaded[key] = whole
        while sum(a.nbytes for a in self._loaded.values()) > self._limits.budget:
            self._loaded.popitem(last=False)
        return whole


def _inflate_all(f: IO[bytes], stream: Deflated, begin: int, out: memoryview, step: int) -> None:
    """`inflate_into` from the stream's start, keeping no position."""
    inflate_into(f, stream, begin, out, positions=None, key=None, step=step)


def _read_at(
    path: ShardPath, shard: _Shard, begin: int, out: memoryview, start: int, row_bytes: int
) -> None:
    """Bytes [begin, begin + len(out)) of a shard's file into `out`, rows from `start` on."""
    if begin + out.nbytes > shard.stamp[0]:
        first = start + _first_missing(shard.stamp[0] - begin, row_bytes)
        raise DecodeError(f"{path} is truncated at record {first}", record=first)
    shard.file.seek(begin)
    done = 0
    while done < out.nbytes:
        n = cast(Any, shard.file).readinto(out[done:])  # FileIO, or an fsspec file
        if not n:
            first = start + done // row_bytes if row_bytes else start
            raise DecodeError(f"{path} was truncated while reading record {first}", record=first)
        done += n
