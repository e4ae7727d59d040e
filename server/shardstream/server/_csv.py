"""The csv shard format: one record per line, numeric comma-separated columns, no header.

OneFlow-style part files (`part-000`, ...) have no suffix, so a dataset names
the format explicitly: `NAME=part-*:csv`.

The fields come from `_schema.json` next to the shard, in column order::

    {"fields": [{"name": "id", "dtype": "int64", "shape": []},
                {"name": "image", "dtype": "uint8", "shape": [32, 32, 3]}]}

Each field takes prod(shape) consecutive columns (1 for a scalar). Without the
file, column 0 is `id` (int64) and the others form `features` (float64 vector).

Parsing a line takes ~8 times its bytes, so a line may be at most 1/8 of
`SHARDSTREAM_READ_BUDGET_BYTES`: a longer one is a `DecodeError` naming it, before it
is read (line 1: at indexing, which otherwise reads blocks, never whole lines). A read
parses its lines in parts of at most half the budget.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import ShardCache, ShardPath, Stamp, open_shard, shard_stat, sibling
from shardstream.server._limits import READ_BUDGET_ENV, read_budget
from shardstream.v1.codec import FieldSpec

__all__ = ["SCHEMA_FILE", "CsvDecoder"]

SCHEMA_FILE = "_schema.json"
_STRIDE = 1024  # the sparse index keeps the byte offset of every _STRIDE-th line
_MAX_INDEXED = 256  # shards whose index an instance keeps
_SCHEMA_EXAMPLE = '{"fields": [{"name": "id", "dtype": "int64", "shape": []}, ...]}'
_INFINITIES = ("inf", "infinity")  # how a csv value may say it is infinite (any case, +/-)
_PIECE = 1 << 20  # bytes of a line read at a time where the line is not kept
# Bytes parsing a line takes per byte of it (numpy's loadtxt copies a line as UCS-4, and
# more): a line may have at most 1/_PARSE_COST of the read budget.
_PARSE_COST = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class _Index:
    stamp: tuple[Stamp, Stamp | None]  # of the shard and of its schema file
    records: int
    columns: int
    schema: tuple[FieldSpec, ...]
    offsets: tuple[int, ...]  # byte offset of lines 0, _STRIDE, 2 * _STRIDE, ...


def _stamp(path: ShardPath) -> tuple[Stamp, Stamp | None]:
    stamp = shard_stat(path)
    try:
        return (stamp, shard_stat(sibling(path, SCHEMA_FILE)))
    except FileNotFoundError:
        return (stamp, None)


def _width(field: FieldSpec) -> int:
    return int(np.prod(field.shape, dtype=np.int64))


def _load_schema(path: ShardPath) -> tuple[FieldSpec, ...] | None:
    file = sibling(path, SCHEMA_FILE)
    try:
        with open_shard(file) as f:
            doc = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"{file} is not valid JSON ({e}); expected {_SCHEMA_EXAMPLE}") from None
    fields = doc.get("fields") if isinstance(doc, dict) else None
    if not isinstance(fields, list) or not fields:
        raise DecodeError(f"{file} needs a non-empty list `fields`, like {_SCHEMA_EXAMPLE}")
    specs: list[FieldSpec] = []
    for i, entry in enumerate(fields):
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str)
        ok = ok and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
        if not ok or not all(type(d) is int for d in entry["shape"]):
            raise DecodeError(
                f"{file}: fields[{i}] must be an object with a string `name`, a string "
                f"`dtype` and a list of integers `shape` ([] for a scalar), got {entry!r}"
            )
        try:
            specs.append(
                FieldSpec(name=entry["name"], dtype=entry["dtype"], shape=tuple(entry["shape"]))
            )
        except (ValueError, TypeError) as e:  # TypeError: numpy knows no such dtype
            raise DecodeError(f"{file}: fields[{i}]: {e}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DecodeError(f"{file}: field names must be unique, got {names}")
    return tuple(specs)


def _fixed_schema(path: ShardPath) -> tuple[FieldSpec, ...] | None:
    """`_load_schema` for csv: fixed-size numbers only (ragged and text need jsonl)."""
    specs = _load_schema(path)
    for spec in specs or ():
        if spec.ragged:
            raise DecodeError(
                f"{sibling(path, SCHEMA_FILE)}: field {spec} is ragged or text, which csv "
                "columns cannot hold; use fixed shapes of numbers (or JSON Lines shards)"
            )
    return specs


def _default_schema(columns: int) -> tuple[FieldSpec, ...]:
    id_field = FieldSpec(name="id", dtype="int64", shape=())
    if columns == 1:
        return (id_field,)
    return (id_field, FieldSpec(name="features", dtype="float64", shape=(columns - 1,)))


def _parse_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype a column is parsed as before the range check and cast."""
    if dtype.kind == "f":
        return np.dtype(np.float64)
    if dtype.kind == "u" and dtype.itemsize == 8:
        return dtype
    return np.dtype(np.int64)  # bool and the other integers


def _decode_lines(path: ShardPath, raw: list[bytes], start: int, columns: int) -> list[str]:
    texts: list[str] = []
    for i, line in enumerate(raw):
        record = start + i
        where = f"{path}: record {record} (line {record + 1})"
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise DecodeError(f"{where} is not UTF-8 text", record=record) from None
        if not text.strip():
            raise DecodeError(f"{where} is empty; every line must hold one record", record=record)
        if text.count(",") + 1 != columns:
            raise DecodeError(
                f"{where} has {text.count(',') + 1} columns, expected {columns} "
                "like the first line and the schema",
                record=record,
            )
        texts.append(text)
    return texts


def _loadtxt(
    path: ShardPath, texts: list[str], start: int, dtype: np.dtype[Any], cols: list[int]
) -> Any:
    try:
        return np.loadtxt(texts, delimiter=",", dtype=dtype, usecols=cols, comments=None, ndmin=2)
    except ValueError as e:
        error = e
    for i, text in enumerate(texts):  # slow path: find the bad line
        try:
            np.loadtxt([text], delimiter=",", dtype=dtype, usecols=cols, comments=None, ndmin=2)
        except ValueError as e:
            why = re.sub(r" at row \d+, column (\d+)", r" in column \1", str(e))
            raise DecodeError(
                f"{path}: record {start + i} (line {start + i + 1}): {why}", record=start + i
            ) from None
    raise DecodeError(f"{path}: records [{start}, {start + len(texts)}): {error}")


def _parse(
    path: ShardPath, texts: list[str], start: int, schema: tuple[FieldSpec, ...]
) -> dict[str, np.ndarray[Any, Any]]:
    count = len(texts)
    out = {f.name: np.empty((count, *f.shape), np.dtype(f.dtype).newbyteorder("<")) for f in schema}
    groups: dict[np.dtype[Any], list[tuple[FieldSpec, int]]] = {}
    column = 0
    for field in schema:
        groups.setdefault(_parse_dtype(np.dtype(field.dtype)), []).append((field, column))
        column += _width(field)
    for parse_dtype, members in groups.items():
        cols = [c for f, lo in members for c in range(lo, lo + _width(f))]
        if not cols or not count:
            continue
        table = _loadtxt(path, texts, start, parse_dtype, cols)
        pos = 0
        for field, lo in members:
            values = table[:, pos : pos + _width(field)]
            pos += _width(field)
            target = np.dtype(field.dtype)
            if target.kind == "f":
                _check_floats(path, texts, start, values, field, lo)
            elif target != parse_dtype:
                low, high = (
                    (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
                )
                bad = np.argwhere((values < low) | (values > high))
                if bad.size:
                    row, col = (int(x) for x in bad[0])
                    raise DecodeError(
                        f"{path}: record {start + row} (line {start + row + 1}): value "
                        f"{values[row, col]} in column {lo + col + 1} is out of range for field "
                        f"{field.name!r} ({target.name}: {low}..{high})",
                        record=start + row,
                    )
            out[field.name].reshape(count, _width(field))[...] = values
    return out


def _check_floats(
    path: ShardPath,
    texts: list[str],
    start: int,
    values: np.ndarray[Any, Any],
    field: FieldSpec,
    lo: int,
) -> None:
    """Refuse a value that is infinite in the field's dtype but was not written as an
    infinity (1e39 in float32, 70000 in float16, 1e400 anywhere)."""
    target = np.dtype(field.dtype)
    with np.errstate(over="ignore"):
        infinite = np.isinf(values.astype(target))
    for row, col in np.argwhere(infinite).tolist():  # row-major: the first bad value first
        token = texts[row].split(",")[lo + col].strip()
        if not np.isinf(values[row, col]) or token.lower().lstrip("+-") not in _INFINITIES:
            limit = float(np.finfo(target).max)
            raise DecodeError(
                f"{path}: record {start + row} (line {start + row + 1}): value {token} in "
                f"column {lo + col + 1} is out of range for field {field.name!r} "
                f"({target.name}: within ±{limit:.7g}, or inf)",
                record=start + row,
            )


def _too_long(path: ShardPath, record: int, budget: int) -> DecodeError:
    return DecodeError(
        f"{path}: record {record} (line {record + 1}) is longer than "
        f"{budget // _PARSE_COST} bytes, what {READ_BUDGET_ENV} ({budget} bytes) lets a line "
        f"be (parsing a line takes ~{_PARSE_COST} times its bytes); not reading it",
        record=record,
    )


def _skip_line(f: Any) -> bool:
    """Read past one line, a piece at a time; False if the file ends first."""
    while piece := f.readline(_PIECE):
        if piece.endswith(b"\n"):
            return True
    return False


def _build_index(path: ShardPath) -> _Index:
    stamp = _stamp(path)
    schema = _fixed_schema(path)
    offsets: list[int] = []
    records = pos = 0
    first: bytes | None = None
    budget = read_budget()
    head = b""  # line 1, to check it against the fields
    last = b"\n"
    with open_shard(path) as f:
        # In blocks, not lines: a long line (a 1 GiB hole reads as NUL bytes) is never held.
        while block := f.read(_PIECE):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + (pos + 1)
            if not records:
                head += block[: int(ends[0]) - pos] if ends.size else block
                if len(head) > budget // _PARSE_COST + 2:
                    raise _too_long(path, 0, budget)
            begun = np.arange(records + 1, records + 1 + ends.size)  # the lines they begin
            offsets.extend(ends[begun % _STRIDE == 0].tolist())
            records += ends.size
            pos += len(block)
            last = block[-1:]
    if pos:
        offsets.insert(0, 0)
        if last != b"\n":  # the last line has no line ending
            records += 1
        elif offsets[-1] == pos:  # no line begins at the end
            offsets.pop()
    if head:
        first = head
    if first is None:
        if schema is None:
            raise DecodeError(
                f"{path} is empty and there is no {SCHEMA_FILE} next to it, so its fields "
                "are unknown; add the schema file or remove the empty shard"
            )
        columns = sum(_width(f) for f in schema)
    else:
        text = first.decode("utf-8", "replace").rstrip("\r\n")
        columns = text.count(",") + 1
        schema = schema or _default_schema(columns)
        width = sum(_width(f) for f in schema)
        if columns != width:
            parts = " + ".join(f"{f.name} {_width(f)}" for f in schema)
            raise DecodeError(
                f"{path}: record 0 (line 1) has {columns} columns but the fields of "
                f"{sibling(path, SCHEMA_FILE)} take {width} ({parts}); fix the schema or the data",
                record=0,
            )
        _parse(path, _decode_lines(path, [first], 0, columns), 0, schema)
    return _Index(
        stamp=stamp, records=records, columns=columns, schema=schema, offsets=tuple(offsets)
    )


@register_decoder
class CsvDecoder(Decoder):
    """Decoder of numeric csv shards (one record per line, no header)."""

    name = "csv"
    suffixes = (".csv",)

    def __init__(self) -> None:
        self._indexes: ShardCache[_Index] = ShardCache(_build_index, _MAX_INDEXED, stamp=_stamp)
        self._budget = read_budget()

    def index(self, path: ShardPath) -> ShardMeta:
        idx = self._index(path)
        return ShardMeta(records=idx.records, schema=idx.schema)

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        if start < 0 or count < 0:
            raise ValueError(f"`start` and `count` must be non-negative, got {start} and {count}")
        idx = self._index(path)
        if start + count > idx.records:
            raise DecodeError(
                f"{path} has {idx.records} records, cannot read [{start}, {start + count}); "
                "did the shard change since it was indexed?",
                record=max(start, idx.records),
            )
        raw: list[bytes] = []
        parts: list[dict[str, np.ndarray[Any, Any]]] = []  # of the lines parsed so far
        held = 0  # bytes of the lines in `raw`
        longest = self._budget // _PARSE_COST  # a line's bytes, without its line ending
        if count:
            with open_shard(path) as f:
                block = start // _STRIDE
                f.seek(idx.offsets[block])
                for _ in range(start - block * _STRIDE):
                    if not _skip_line(f):
                        raise DecodeError(f"{path} ends before record {start}", record=start)
                done = 0  # records in `parts`
                while done + len(raw) < count:
                    line = f.readline(longest + 3)  # a longer line is refused, not held
                    record = start + done + len(raw)
                    if not line:
                        raise DecodeError(f"{path} ends before record {record}", record=record)
                    if len(line) > longest + 2:
                        raise _too_long(path, record, self._budget)
                    if raw and held + len(line) > self._budget // 2:
                        # Parsed in parts: the lines and their text stay within the budget.
                        parts.append(self._lines(path, idx, raw, start + done))
                        done, raw, held = done + len(raw), [], 0
                    raw.append(line)
                    held += len(line)
        if parts and raw:
            parts.append(self._lines(path, idx, raw, start + count - len(raw)))
        if not parts:
            return self._lines(path, idx, raw, start)
        return {f.name: np.concatenate([p[f.name] for p in parts]) for f in idx.schema}

    def _lines(
        self, path: ShardPath, idx: _Index, raw: list[bytes], start: int
    ) -> dict[str, np.ndarray[Any, Any]]:
        return _parse(path, _decode_lines(path, raw, start, idx.columns), start, idx.schema)

    def _index(self, path: ShardPath) -> _Index:
        return self._indexes.get(path)
