"""Parquet shards (`.parquet`, `.pq`): one field per column, one record per row.

Needs pyarrow (`pip install 'shardstream[parquet]'`); without it the format
refuses to index with that hint, and the rest of the worker is unaffected.

- numeric columns (bool, int8 ... uint64, float16/32/64) are scalar fields;
- `fixed_size_list` columns of numbers (nested: more dimensions) are fields of
  that shape;
- `list` / `large_list` columns of numbers (outermost level only; inner levels
  fixed-size lists) are ragged fields, `dtype[*]` or `dtype[*, ...]`;
- a column's field metadata `shardstream.shape` (JSON, e.g. `[32, 32, 3]`)
  makes a list column fixed, of that shape (every row must then hold
  prod(shape) values);
- `string` / `large_string` columns are "string" fields; `binary`,
  `large_binary` and `fixed_size_binary` columns are "bytes" fields.

A `_schema.json` beside the shards may select the columns served, in order::

    {"columns": ["caption", "tokens", "label"]}

Without it every usable column is served; the others (structs, maps,
dictionaries, timestamps, decimals, lists of strings...) are left out with a
log line naming them. A selected column that is missing or unusable is
refused at index time naming it. A null is refused at read time naming the
column and the first record holding it. Indexing reads the footer only; a
read decodes only the row groups covering its range, in batches of rows within
`SHARDSTREAM_READ_BUDGET_BYTES` and only as far as its last record.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import (
    ShardCache,
    ShardPath,
    Stamp,
    local_file,
    open_shard,
    shard_stat,
    sibling,
)
from shardstream.server._limits import read_budget
from shardstream.v1.codec import RAGGED, FieldSpec
from shardstream.v1.ragged import Ragged

__all__ = ["SCHEMA_FILE", "SHAPE_KEY", "ParquetDecoder"]

SHAPE_KEY = b"shardstream.shape"
SCHEMA_FILE = "_schema.json"
_SCHEMA_EXAMPLE = '{"columns": ["caption", "tokens"]}'
_MAX_INDEXED = 256  # shards whose index an instance keeps
# pyarrow reads a local shard through the checked descriptor's /proc/self/fd entry
_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
_HINT = (
    "fields need numbers, (fixed-size) lists of numbers, strings or binary; drop or convert "
    "the column"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Column:
    field: FieldSpec
    levels: tuple[int, ...]  # values per item at each list level, outermost first
    variable: bool  # the outermost level is a list / large_list
    # A `variable` list column served as a fixed field (`shardstream.shape`): every row's
    # length must be levels[0]; otherwise the column is ragged.


@dataclass(frozen=True, slots=True, kw_only=True)
class _Index:
    stamp: tuple[Stamp, Stamp | None]  # of the shard and of its _schema.json
    metadata: Any  # pyarrow.parquet.FileMetaData: reused by every read
    starts: tuple[int, ...]  # first record of each row group, then the record count
    columns: tuple[_Column, ...]
    skipped: tuple[str, ...]


def _stamp(path: ShardPath) -> tuple[Stamp, Stamp | None]:
    stamp = shard_stat(path)
    try:
        return (stamp, shard_stat(sibling(path, SCHEMA_FILE)))
    except FileNotFoundError:
        return (stamp, None)


def _selection(path: ShardPath) -> list[str] | None:
    """The columns `_schema.json` beside the shard selects (None: no such file)."""
    file = sibling(path, SCHEMA_FILE)
    try:
        with open_shard(file) as f:
            doc = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"{file} is not valid JSON ({e}); expected {_SCHEMA_EXAMPLE}") from None
    columns = doc.get("columns") if isinstance(doc, dict) else None
    if (
        not isinstance(columns, list)
        or not columns
        or not all(isinstance(c, str) for c in columns)
        or len(set(columns)) != len(columns)
    ):
        raise DecodeError(
            f"{file} needs a non-empty list `columns` of distinct column names, like "
            f"{_SCHEMA_EXAMPLE}; got {doc!r}"
        )
    return list(columns)


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
    """A ParquetFile and the file to close after it. A local shard is the file
    `open_shard` opened (and checked against the stamp a read pinned): pyarrow opens
    that descriptor through /proc/self/fd, natively, where there is one."""
    f = open_shard(path)
    try:
        if local_file(path) is not None and _PROC_FD:
            return pq.ParquetFile(f"/proc/self/fd/{f.fileno()}", metadata=metadata), f
        return pq.ParquetFile(f, metadata=metadata), f
    except BaseException:
        f.close()
        raise


def _column(path: ShardPath, pf: Any, index: int) -> _Column:
    import pyarrow as pa

    field = pf.schema_arrow.field(index)
    where = f"{path}: column {field.name!r}"
    t, dims, variable = field.type, [], False
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _Column(field=FieldSpec(field.name, "string", ()), levels=(), variable=False)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return _Column(field=FieldSpec(field.name, "bytes", ()), levels=(), variable=False)
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if pa.types.is_fixed_size_list(t):
            dims.append(t.list_size)
        elif dims:
            raise DecodeError(f"{where} has type {field.type}: only the outermost list may vary")
        else:
            variable = True
            dims.append(RAGGED)
        t = t.value_type
    if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DecodeError(f"{where} has type {field.type}, which cannot be a field: {_HINT}")
    dtype = np.dtype(t.to_pandas_dtype()).name
    shape = _metadata_shape(where, field.metadata or {})
    inner = int(np.prod(dims[1:], dtype=np.int64))
    if variable and shape is None:  # ragged: dtype[*, *inner]
        spec = FieldSpec(name=field.name, dtype=dtype, shape=tuple(dims))
        return _Column(field=spec, levels=tuple(dims), variable=True)
    if variable and shape is not None:
        if inner == 0 or int(np.prod(shape, dtype=np.int64)) % inner:
            raise DecodeError(f"{where}: {SHAPE_KEY.decode()} {list(shape)} does not fit {t}")
        dims[0] = int(np.prod(shape, dtype=np.int64)) // inner
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


def _build_index(path: ShardPath) -> _Index:
    pq, errors = _pyarrow()
    stamp = _stamp(path)
    selected = _selection(path)
    try:
        pf, f = _open(pq, path)
    except errors as e:
        raise DecodeError(f"{path} is not a readable parquet file: {e}") from None
    try:
        metadata = pf.metadata
        names = list(pf.schema_arrow.names)
        if selected is not None:
            missing = [c for c in selected if c not in names]
            if missing:
                raise DecodeError(
                    f"{path}: {sibling(path, SCHEMA_FILE)} selects columns {missing}, which the "
                    f"shard does not have (it has {names})"
                )
        columns: list[_Column] = []
        skipped: list[str] = []
        for i, name in enumerate(names):
            if selected is not None and name not in selected:
                continue
            try:
                columns.append(_column(path, pf, i))
            except DecodeError as e:
                if selected is not None:
                    raise
                skipped.append(f"column {name!r} ({pf.schema_arrow.field(i).type}): {e}")
    except errors as e:
        raise DecodeError(f"{path}: cannot read its schema: {e}") from None
    finally:
        if f is not None:
            f.close()
    if selected is not None:
        columns.sort(key=lambda c: selected.index(c.field.name))
    names = [c.field.name for c in columns]
    if not columns or len(set(names)) != len(names):
        raise DecodeError(
            f"{path} has usable columns {names}; a parquet shard needs at least one, with "
            f"unique names{' (left out: ' + '; '.join(skipped) + ')' if skipped else ''}"
        )
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return _Index(
        stamp=stamp,
        metadata=metadata,
        starts=tuple(starts),
        columns=tuple(columns),
        skipped=tuple(skipped),
    )


def _first_null(array: Any) -> int:
    return int(np.flatnonzero(~np.asarray(array.is_valid().to_numpy(zero_copy_only=False)))[0])


def _check_nulls(
    path: ShardPath,
    values: Any,
    name: str,
    start: int,
    per_item: int,
    ends: np.ndarray[Any, Any] | None = None,
) -> None:
    """Refuse a null, naming its record: item i belongs to record i // per_item, or
    (ragged, `ends`: each record's end in outer items) to the record holding item
    i // per_item."""
    if values.null_count:
        item = _first_null(values) // per_item
        record = start + (item if ends is None else int(np.searchsorted(ends, item, "right")))
        raise DecodeError(
            f"{path}: column {name!r} holds a null at record {record}; nulls cannot be "
            "values of a field (fill or drop them when writing the shard)",
            record=record,
        )


def _text(path: ShardPath, chunked: Any, column: _Column, start: int) -> Ragged:
    """A string / binary column's values as uint8 bytes and offsets."""
    import pyarrow as pa

    values = chunked.combine_chunks()
    _check_nulls(path, values, column.field.name, start, 1)
    if pa.types.is_fixed_size_binary(values.type):
        values = values.cast(pa.binary())
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    buffers = values.buffers()
    n = len(values)
    offsets = np.frombuffer(buffers[1], np.int64 if large else np.int32)[
        values.offset : values.offset + n + 1
    ].astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    lo, hi = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    return Ragged(data[lo:hi].copy(), offsets - lo)


def _to_numpy(path: ShardPath, chunked: Any, column: _Column, start: int, count: int) -> Any:
    if column.field.ragged and not column.field.shape:
        return _text(path, chunked, column, start)
    values = chunked.combine_chunks()
    name = column.field.name
    ragged = column.field.ragged
    lengths: np.ndarray[Any, Any] | None = None
    ends: np.ndarray[Any, Any] | None = None
    per_item = 1  # array items per record (ragged: per outer item) at the current level
    for level, size in enumerate((*column.levels, None)):
        _check_nulls(path, values, name, start, per_item, ends)
        if size is None:
            break
        if level == 0 and column.variable:
            lengths = values.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
            if not ragged:
                bad = np.flatnonzero(lengths != size)
                if bad.size:
                    record = start + int(bad[0])
                    raise DecodeError(
                        f"{path}: column {name!r} has {lengths[bad[0]]} values at record "
                        f"{record}, but its {SHAPE_KEY.decode()} says {size}; every row of "
                        "a list column with a fixed shape must have that length",
                        record=record,
                    )
        values = values.flatten()
        if level == 0 and ragged:
            assert lengths is not None
            ends = np.cumsum(lengths)
        else:
            per_item *= size
    flat = values.to_numpy(zero_copy_only=False)
    little = np.dtype(column.field.dtype).newbyteorder("<")
    if ragged:
        assert lengths is not None
        items = np.ascontiguousarray(flat.reshape(-1, *column.field.inner), dtype=little)
        return Ragged.from_lengths(items, lengths)
    return np.ascontiguousarray(flat.reshape(count, *column.field.shape), dtype=little)


@register_decoder
class ParquetDecoder(Decoder):
    """Decoder of Parquet shards (numeric, list, string and binary columns)."""

    name = "parquet"
    suffixes = (".parquet", ".pq")

    def __init__(self) -> None:
        self._indexes: ShardCache[_Index] = ShardCache(_build_index, _MAX_INDEXED, stamp=_stamp)
        self._budget = read_budget()

    def index(self, path: ShardPath) -> ShardMeta:
        idx = self._index(path)
        schema = tuple(c.field for c in idx.columns)
        return ShardMeta(records=idx.starts[-1], schema=schema, skipped=idx.skipped)

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, Any]:
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
            return {c.field.name: _empty(c.field) for c in idx.columns}
        first = bisect.bisect_right(idx.starts, start) - 1
        last = bisect.bisect_right(idx.starts, start + count - 1) - 1
        pq, errors = _pyarrow()
        pf, f = _open(pq, path, idx.metadata)
        try:
            table = _rows(path, pf, idx, (first, last), start, count, self._budget)
        except errors as e:
            raise DecodeError(
                f"{path}: row groups {first}..{last} (records [{idx.starts[first]}, "
                f"{idx.starts[last + 1]})) cannot be read: {e}",
                record=idx.starts[first],
            ) from None
        finally:
            if f is not None:
                f.close()
        return {
            c.field.name: _to_numpy(path, table.column(c.field.name), c, start, count)
            for c in idx.columns
        }

    def _index(self, path: ShardPath) -> _Index:
        return self._indexes.get(path)


def _rows(
    path: ShardPath,
    pf: Any,
    idx: _Index,
    groups: tuple[int, int],
    start: int,
    count: int,
    budget: int,
) -> Any:
    """Records [start, start + count) of row groups first..last as a table, decoded in
    batches of rows that fit the read budget: memory follows the rows read, not the row
    groups (a row group of 10^8 zeros takes ~1 MB on disk). The rows of the first group
    before `start` are decoded a batch at a time and dropped."""
    import pyarrow as pa

    first, last = groups
    row = sum(c.field.record_bytes for c in idx.columns)  # bytes of a row's fixed fields
    for group in range(first, last + 1):  # what the writer says a row takes (ragged fields)
        meta = idx.metadata.row_group(group)
        row = max(row, -(-meta.total_byte_size // max(1, meta.num_rows)))
    skip = start - idx.starts[first]
    size = max(1, min(budget // max(1, row), skip + count))
    batches = pf.iter_batches(
        batch_size=size,
        row_groups=range(first, last + 1),
        columns=[c.field.name for c in idx.columns],
        use_threads=False,
    )
    kept: list[Any] = []
    need = count
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        part = batch.slice(skip, need)
        skip, need = 0, need - part.num_rows
        kept.append(part)
        if not need:
            break
    if need:
        raise DecodeError(
            f"{path}: row groups {first}..{last} hold fewer rows than its metadata says "
            f"(record {start + count - need} is missing); did the shard change?",
            record=start + count - need,
        )
    return pa.Table.from_batches(kept)


def _empty(field: FieldSpec) -> Any:
    if field.ragged:
        return Ragged.empty("uint8" if not field.shape else field.dtype, field.inner)
    return np.empty((0, *field.shape), np.dtype(field.dtype))
