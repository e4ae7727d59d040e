"""Parquet shards (`.parquet`, `.pq`): one field per column, one record per row.

Needs pyarrow (`pip install 'shardstream[parquet]'`); without it the format
refuses to index with that hint, and the rest of the worker is unaffected.

- numeric columns (bool, int8 ... uint64, float16/32/64) are scalar fields;
- `fixed_size_list` columns of numbers (nested: more dimensions) are fields of
  that shape;
- `list` / `large_list` columns of numbers (outermost level only) are 1-D
  fields whose length comes from the first row, and every row must have it;
- a column's field metadata `shardstream.shape` (JSON, e.g. `[32, 32, 3]`)
  reshapes it (the product must match the number of values per row).

Other types (strings, binary, structs, maps, dictionaries, timestamps,
decimals) are refused at index time naming the column; a null is refused at
read time naming the column and the first record holding it. Indexing reads
the footer only (plus the first row of a variable-length list column without
`shardstream.shape`); a read decodes only the row groups covering its range.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import ShardCache, ShardPath, Stamp, open_shard, shard_stat
from shardstream.v1.codec import FieldSpec

__all__ = ["SHAPE_KEY", "ParquetDecoder"]

SHAPE_KEY = b"shardstream.shape"
_MAX_INDEXED = 256  # shards whose index an instance keeps
_HINT = "tensor fields need numbers or (fixed-size) lists of numbers; drop or convert the column"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Column:
    field: FieldSpec
    levels: tuple[int, ...]  # values per item at each list level, outermost first
    variable: bool  # the outermost level is a list / large_list: check each row's length


@dataclass(frozen=True, slots=True, kw_only=True)
class _Index:
    stamp: Stamp
    metadata: Any  # pyarrow.parquet.FileMetaData: reused by every read
    starts: tuple[int, ...]  # first record of each row group, then the record count
    columns: tuple[_Column, ...]


def _pyarrow() -> tuple[Any, tuple[type[Exception], ...]]:
    """pyarrow.parquet, and the errors pyarrow raises for unreadable files."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DecodeError(
            "the parquet format needs pyarrow, which is not installed: "
            "pip install 'shardstream[parquet]'"
        ) from None
    return pq, (OSError, pa.ArrowException)


def _open(pq: Any, path: ShardPath, metadata: Any = None) -> tuple[Any, Any]:
    """A ParquetFile and the file to close after it (None for a local path)."""
    if isinstance(path, Path):
        return pq.ParquetFile(str(path), metadata=metadata), None
    f = open_shard(path)
    try:
        return pq.ParquetFile(f, metadata=metadata), f
    except BaseException:
        f.close()
        raise


def _column(path: ShardPath, pf: Any, index: int) -> _Column:
    import pyarrow as pa

    field = pf.schema_arrow.field(index)
    where = f"{path}: column {field.name!r}"
    t, dims, variable = field.type, [], False
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if pa.types.is_fixed_size_list(t):
            dims.append(t.list_size)
        elif dims:
            raise DecodeError(f"{where} has type {field.type}: only the outermost list may vary")
        else:
            variable = True
            dims.append(-1)
        t = t.value_type
    if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DecodeError(f"{where} has type {field.type}, which cannot be a field: {_HINT}")
    dtype = np.dtype(t.to_pandas_dtype()).name
    shape = _metadata_shape(where, field.metadata or {})
    inner = int(np.prod(dims[1:], dtype=np.int64))
    if variable and shape is not None:
        if inner == 0 or int(np.prod(shape, dtype=np.int64)) % inner:
            raise DecodeError(f"{where}: {SHAPE_KEY.decode()} {list(shape)} does not fit {t}")
        dims[0] = int(np.prod(shape, dtype=np.int64)) // inner
    elif variable:
        dims[0] = _first_length(where, pf, field.name)
    if shape is None:
        shape = tuple(dims)
    elif int(np.prod(shape, dtype=np.int64)) != int(np.prod(dims, dtype=np.int64)):
        raise DecodeError(
            f"{where}: {SHAPE_KEY.decode()} {list(shape)} holds {int(np.prod(shape))} values, "
            f"but a row holds {int(np.prod(dims))} ({field.type})"
        )
    return _Column(
        field=FieldSpec(name=field.name, dtype=dtype, shape=shape),
        levels=tuple(dims),
        variable=variable,
    )


def _metadata_shape(where: str, metadata: dict[bytes, bytes]) -> tuple[int, ...] | None:
    raw = metadata.get(SHAPE_KEY)
    if raw is None:
        return None
    try:
        shape = json.loads(raw)
    except ValueError:
        shape = None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(
            f"{where}: metadata {SHAPE_KEY.decode()} must be a JSON list of non-negative "
            f"integers like [32, 32, 3], got {raw!r}"
        )
    return tuple(shape)


def _first_length(where: str, pf: Any, name: str) -> int:
    for group in range(pf.metadata.num_row_groups):
        if pf.metadata.row_group(group).num_rows:
            first = pf.read_row_group(group, columns=[name], use_threads=False).column(0)[0]
            if not first.is_valid:
                raise DecodeError(f"{where} is null at record 0; nulls cannot be tensors", record=0)
            return len(first)
    raise DecodeError(
        f"{where} is a variable-length list in a shard without rows, so its length is "
        f"unknown: give the column {SHAPE_KEY.decode()} metadata or remove the empty shard"
    )


def _build_index(path: ShardPath) -> _Index:
    pq, errors = _pyarrow()
    stamp = shard_stat(path)
    try:
        pf, f = _open(pq, path)
    except errors as e:
        raise DecodeError(f"{path} is not a readable parquet file: {e}") from None
    try:
        metadata = pf.metadata
        columns = tuple(_column(path, pf, i) for i in range(len(pf.schema_arrow)))
    except errors as e:
        raise DecodeError(f"{path}: cannot read its schema or first rows: {e}") from None
    finally:
        if f is not None:
            f.close()
    names = [c.field.name for c in columns]
    if not columns or len(set(names)) != len(names):
        raise DecodeError(
            f"{path} has columns {names}; a parquet shard needs at least one column, "
            "with unique names"
        )
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return _Index(stamp=stamp, metadata=metadata, starts=tuple(starts), columns=columns)


def _first_null(array: Any) -> int:
    return int(np.flatnonzero(~np.asarray(array.is_valid().to_numpy(zero_copy_only=False)))[0])


def _to_numpy(
    path: ShardPath, chunked: Any, column: _Column, start: int, count: int
) -> np.ndarray[Any, Any]:
    values = chunked.combine_chunks()
    name = column.field.name
    per_item = 1  # array items per record at the current level
    for level, size in enumerate((*column.levels, None)):
        if values.null_count:
            record = start + _first_null(values) // per_item
            raise DecodeError(
                f"{path}: column {name!r} holds a null at record {record}; nulls cannot be "
                "tensors (fill or drop them when writing the shard)",
                record=record,
            )
        if size is None:
            break
        if level == 0 and column.variable:
            lengths = values.value_lengths().to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != size)
            if bad.size:
                record = start + int(bad[0])
                raise DecodeError(
                    f"{path}: column {name!r} has {lengths[bad[0]]} values at record {record}, "
                    f"but {size} at record 0 (or in its {SHAPE_KEY.decode()}); every row of a "
                    "list column must have the same length",
                    record=record,
                )
        values = values.flatten()
        per_item *= size
    flat = values.to_numpy(zero_copy_only=False)
    little = np.dtype(column.field.dtype).newbyteorder("<")
    return np.ascontiguousarray(flat.reshape(count, *column.field.shape), dtype=little)


@register_decoder
class ParquetDecoder(Decoder):
    """Decoder of Parquet shards (numeric and fixed-length list columns)."""

    name = "parquet"
    suffixes = (".parquet", ".pq")

    def __init__(self) -> None:
        self._indexes: ShardCache[_Index] = ShardCache(_build_index, _MAX_INDEXED)

    def index(self, path: ShardPath) -> ShardMeta:
        idx = self._index(path)
        return ShardMeta(records=idx.starts[-1], schema=tuple(c.field for c in idx.columns))

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        if start < 0 or count < 0:
            raise ValueError(f"`start` and `count` must be non-negative, got {start} and {count}")
        idx = self._index(path)
        records = idx.starts[-1]
        if start + count > records:
            raise DecodeError(
                f"{path} has {records} records, cannot read [{start}, {start + count}); "
                "did the shard change since it was indexed?",
                record=max(start, records),
            )
        if not count:
            return {
                c.field.name: np.empty((0, *c.field.shape), np.dtype(c.field.dtype))
                for c in idx.columns
            }
        first = bisect.bisect_right(idx.starts, start) - 1
        last = bisect.bisect_right(idx.starts, start + count - 1) - 1
        names = [c.field.name for c in idx.columns]
        pq, errors = _pyarrow()
        pf, f = _open(pq, path, idx.metadata)
        try:
            table = pf.read_row_groups(range(first, last + 1), columns=names, use_threads=False)
        except errors as e:
            raise DecodeError(
                f"{path}: row groups {first}..{last} (records [{idx.starts[first]}, "
                f"{idx.starts[last + 1]})) cannot be read: {e}",
                record=idx.starts[first],
            ) from None
        finally:
            if f is not None:
                f.close()
        table = table.slice(start - idx.starts[first], count)
        return {
            c.field.name: _to_numpy(path, table.column(c.field.name), c, start, count)
            for c in idx.columns
        }

    def _index(self, path: ShardPath) -> _Index:
        return self._indexes.get(path)
