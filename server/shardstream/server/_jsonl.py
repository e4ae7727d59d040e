"""JSON Lines shards (`.jsonl`): one record per line, a JSON object each.

The fields come from `_schema.json` beside the shards, as for csv, where a
shape may start with -1 (ragged) and a dtype may be "string" or "bytes" (a
JSON string, served as its UTF-8)::

    {"fields": [{"name": "text", "dtype": "string", "shape": []},
                {"name": "tokens", "dtype": "int32", "shape": [-1]},
                {"name": "score", "dtype": "float32", "shape": []}]}

Keys of a line that no field names are ignored. Without the file, the fields
are inferred from the shard's first lines (`INFER_LINES`, fewer where they pass
the read budget together), in the order their
keys first appear: JSON numbers are int64 (float64 if any is fractional),
booleans bool, strings "string", lists of numbers ragged `int64[*]` /
`float64[*]` (lists of equal-length lists of numbers: `[*, k]`). A key whose
values are anything else (objects, nulls, mixed kinds) or that some of those
lines lack is left out, with a log line naming it; declare it in
`_schema.json` to make such a value an error instead. Shards inferred
differently are refused at start-up (declare the fields then).

Indexing reads the shard once and keeps each line's byte range (blank lines
are not records), so a read seeks straight to its first line. A line that is
not a JSON object of the declared fields (invalid JSON or UTF-8, a missing
key, a list where the field is fixed, a number where it is ragged, a value out
of its dtype's range...) is a `DecodeError` naming the shard and record, and so
is a line longer than the read budget (`SHARDSTREAM_READ_BUDGET_BYTES`), before
it is read, and a line that may hold more values than the budget lets a read decode
(one per comma, `_VALUE_BYTES` each), before it is parsed.
"""

from __future__ import annotations

import array
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstream.server._csv import SCHEMA_FILE, _load_schema
from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import ShardCache, ShardPath, Stamp, open_shard, shard_stat, sibling
from shardstream.server._limits import READ_BUDGET_ENV, read_budget
from shardstream.v1.codec import RAGGED, TEXT_DTYPES, FieldSpec
from shardstream.v1.ragged import Ragged

__all__ = ["INFER_LINES", "JsonlDecoder"]

INFER_LINES = 64  # lines looked at to infer the fields when there is no _schema.json
_MAX_INDEXED = 256  # shards whose index an instance keeps
_PIECE = 1 << 20  # bytes of a line indexing reads at a time
# Bytes decoding one JSON value may take: a list's slot and an int object (8 + 32), then
# its items in arrays (the parsed list's, the converted one's: 8 + 8).
_VALUE_BYTES = 56


@dataclass(frozen=True, slots=True, kw_only=True)
class _Index:
    stamp: tuple[Stamp, Stamp | None]  # of the shard and of its _schema.json
    spans: np.ndarray[Any, np.dtype[np.int64]]  # (records, 2): each line's [begin, end)
    schema: tuple[FieldSpec, ...]
    skipped: tuple[str, ...]


def _stamp(path: ShardPath) -> tuple[Stamp, Stamp | None]:
    stamp = shard_stat(path)
    try:
        return (stamp, shard_stat(sibling(path, SCHEMA_FILE)))
    except FileNotFoundError:
        return (stamp, None)


def _build_index(path: ShardPath) -> _Index:
    stamp = _stamp(path)
    declared = _load_schema(path)
    # Each line's [begin, end), 16 bytes a line (a list of tuples took ~120: 4 GB for a
    # 100 MB shard of short lines).
    spans = array.array("q")
    first: list[bytes] = []  # to infer the fields from, where none are declared
    budget = read_budget()
    kept = 0  # bytes of `first`: at most the read budget in all, however many lines
    pos = 0
    with open_shard(path) as f:
        while piece := f.readline(_PIECE):  # a line in pieces: a huge one is never held
            begin, blank, trail = pos, True, 0
            infer = declared is None and len(first) < INFER_LINES and kept <= budget
            keep: list[bytes] | None = [] if infer else None
            while True:
                pos += len(piece)
                blank = blank and not piece.strip()
                run = len(piece) - len(piece.rstrip(b"\r\n"))  # the line ending's bytes
                trail = trail + run if run == len(piece) else run
                if keep is not None:
                    if pos - begin > budget + 2:
                        raise DecodeError(
                            f"{path}: record {len(spans) // 2} is longer than "
                            f"{READ_BUDGET_ENV} ({budget} bytes) lets one record be; declare "
                            f"the fields in a {SCHEMA_FILE} beside the shards (then such a "
                            "record is refused when read, not the shard)",
                            record=len(spans) // 2,
                        )
                    keep.append(piece)
                if piece.endswith(b"\n"):
                    break
                piece = f.readline(_PIECE)
                if not piece:
                    break
            if not blank:
                if keep is not None:
                    first.append(b"".join(keep).rstrip(b"\r\n"))
                    kept += len(first[-1])
                spans.extend((begin, pos - trail))
    skipped: tuple[str, ...] = ()
    if declared is None:
        schema, skipped = _infer(path, first)
    else:
        schema = declared
    return _Index(
        stamp=stamp,
        spans=np.frombuffer(spans, np.int64).reshape(-1, 2),
        schema=schema,
        skipped=skipped,
    )


def _parse(path: ShardPath, line: bytes, record: int, budget: int) -> dict[str, Any]:
    # Refused before it is parsed: a line whose values would take more than the read
    # budget to decode (a list of 30M zeros is 57 MiB of text, ~0.9 GB decoded). A value
    # ends at a comma but for the last of each list or object, so a line of L bytes holds
    # at most L / 2 + 1 of them: only a long line is counted.
    if (len(line) // 2 + 1) * _VALUE_BYTES > budget:
        values = line.count(b",") + 1
        if values * _VALUE_BYTES > budget:
            raise DecodeError(
                f"{path}: record {record} holds up to {values} values (lists' items, objects' "
                f"keys and values: one per comma), which take ~{values * _VALUE_BYTES} bytes "
                f"to decode ({_VALUE_BYTES} each), more than {READ_BUDGET_ENV} ({budget} "
                "bytes) lets one read hold besides its records; raise it, or split the record",
                record=record,
            )
    try:
        doc = json.loads(line)
    except UnicodeDecodeError as e:
        raise DecodeError(
            f"{path}: record {record} is not valid UTF-8 ({e.reason} at byte {e.start})",
            record=record,
        ) from None
    except RecursionError:
        raise DecodeError(
            f"{path}: record {record} nests lists or objects deeper than the JSON parser goes",
            record=record,
        ) from None
    except ValueError as e:
        raise DecodeError(
            f"{path}: record {record} is not valid JSON ({e})", record=record
        ) from None
    if not isinstance(doc, dict):
        raise DecodeError(
            f"{path}: record {record} is a JSON {type(doc).__name__}, not an object of fields",
            record=record,
        )
    return doc


def _kind(value: Any) -> tuple[str, int] | None:
    """("bool" | "int" | "float" | "string", 0) for a scalar, (element kind, -1) for a
    list of numbers, (element kind, k) for a list of k-lists of numbers; None if unusable."""
    if isinstance(value, bool):
        return ("bool", 0)
    if isinstance(value, int):
        return ("int", 0)
    if isinstance(value, float):
        return ("float", 0)
    if isinstance(value, str):
        return ("string", 0)
    if not isinstance(value, list):
        return None
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return ("float" if any(isinstance(v, float) for v in value) else "int", -1)
    if all(isinstance(v, list) for v in value):
        widths = {len(v) for v in value}
        items = [x for v in value for x in v]
        if len(widths) == 1 and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in items
        ):
            return ("float" if any(isinstance(x, float) for x in items) else "int", widths.pop())
    return None


def _infer(path: ShardPath, lines: list[bytes]) -> tuple[tuple[FieldSpec, ...], tuple[str, ...]]:
    budget = read_budget()
    docs = [_parse(path, line, i, budget) for i, line in enumerate(lines)]
    keys: dict[str, None] = {}
    for doc in docs:
        keys.update(dict.fromkeys(doc))
    fields: list[FieldSpec] = []
    skipped: list[str] = []
    for key in keys:
        where = f"key {key!r}"
        kinds = set()
        for i, doc in enumerate(docs):
            if key not in doc:
                skipped.append(f"{where}: missing from record {i}")
                break
            kind = _kind(doc[key])
            if kind is None:
                skipped.append(f"{where}: record {i} holds {json.dumps(doc[key])[:40]}")
                break
            kinds.add(kind)
        else:
            spec = _field(key, kinds)
            if spec is None:
                skipped.append(f"{where}: its values mix kinds {sorted(kinds)}")
            else:
                fields.append(spec)
    if not fields:
        raise DecodeError(
            f"{path}: no field could be inferred from its first {len(docs)} records "
            f"(left out: {'; '.join(skipped) or 'no keys'}); declare the fields in a "
            f"{SCHEMA_FILE} beside the shards"
        )
    return tuple(fields), tuple(skipped)


def _field(name: str, kinds: set[tuple[str, int]]) -> FieldSpec | None:
    elements = {k for k, _ in kinds}
    shapes = {s for _, s in kinds}
    if len(shapes) != 1:
        # an empty list reads as (int, -1): it joins lists of k-lists
        if shapes - {-1} and len(shapes - {-1}) == 1 and ("int", -1) in kinds:
            shapes = shapes - {-1}
        else:
            return None
    (shape,) = shapes
    if elements == {"string"} and shape == 0:
        return FieldSpec(name, "string", ())
    if "string" in elements or ("bool" in elements and elements != {"bool"}):
        return None
    dtype = "bool" if elements == {"bool"} else "float64" if "float" in elements else "int64"
    dims = () if shape == 0 else (RAGGED,) if shape == -1 else (RAGGED, shape)
    return FieldSpec(name, dtype, dims)


def _value(path: ShardPath, spec: FieldSpec, doc: dict[str, Any], record: int) -> Any:
    """One record's value of a field, as the schema declares it."""
    where = f"{path}: record {record}, field {spec.name!r} ({spec})"
    if spec.name not in doc:
        raise DecodeError(f"{where}: the record has no key {spec.name!r}", record=record)
    value = doc[spec.name]
    if spec.dtype in TEXT_DTYPES:
        if not isinstance(value, str):
            raise DecodeError(
                f"{where} holds {json.dumps(value)[:40]}, not a string", record=record
            )
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError(
                f"{where} holds an unpaired surrogate, not UTF-8", record=record
            ) from None
    if spec.ragged and not isinstance(value, list):
        raise DecodeError(
            f"{where}: a single value where the schema says ragged (a list)", record=record
        )
    if not spec.ragged and spec.shape == () and isinstance(value, list):
        raise DecodeError(
            f"{where}: a list (ragged) where the schema says a fixed scalar", record=record
        )
    try:
        array = np.asarray(value) if value != [] else np.empty((0, *spec.inner))
    except ValueError:  # lists of unequal lengths
        array = np.empty(0, object)
    dtype = np.dtype(spec.dtype)
    ok = array.dtype.kind in ("b" if dtype.kind == "b" else "iu" if dtype.kind in "iu" else "biuf")
    if array.dtype.kind == "b" and dtype.kind != "b":
        ok = False
    if not ok and (array.size or array.dtype == object):
        raise DecodeError(
            f"{where} holds {json.dumps(value)[:40]}: not {dtype.name} numbers", record=record
        )
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype)
    if dtype.kind in "iu" and array.size and not np.array_equal(converted, array):
        raise DecodeError(f"{where} holds values out of the {dtype.name} range", record=record)
    if (
        dtype.kind == "f"
        and array.size
        and not np.array_equal(np.isfinite(converted), np.isfinite(array))
    ):  # 1e39 in float32 would be inf: refused, as csv refuses it
        raise DecodeError(f"{where} holds values out of the {dtype.name} range", record=record)
    expected = (len(value), *spec.inner) if spec.ragged else spec.shape
    if converted.shape != expected:
        what = "ragged" if spec.ragged else "fixed"
        raise DecodeError(
            f"{where} has shape {list(converted.shape)}, the schema says {what} {list(spec.shape)}",
            record=record,
        )
    return converted


@register_decoder
class JsonlDecoder(Decoder):
    """Decoder of JSON Lines shards (numbers, lists of numbers, strings)."""

    name = "jsonl"
    suffixes = (".jsonl",)

    def __init__(self) -> None:
        self._indexes: ShardCache[_Index] = ShardCache(_build_index, _MAX_INDEXED, stamp=_stamp)
        self._budget = read_budget()

    def index(self, path: ShardPath) -> ShardMeta:
        idx = self._indexes.get(path)
        return ShardMeta(records=len(idx.spans), schema=idx.schema, skipped=idx.skipped)

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, Any]:
        if start < 0 or count < 0:
            raise ValueError(f"`start` and `count` must be non-negative, got {start} and {count}")
        idx = self._indexes.get(path)
        if start + count > len(idx.spans):
            raise DecodeError(
                f"{path} has {len(idx.spans)} records, cannot read [{start}, {start + count}); "
                "did the shard change since it was indexed?",
                record=max(start, len(idx.spans)),
            )
        spans = idx.spans[start : start + count]
        if count:
            lengths = spans[:, 1] - spans[:, 0]
            longest = int(np.argmax(lengths))
            if int(lengths[longest]) > self._budget:  # refused before it is read
                record = start + longest
                raise DecodeError(
                    f"{path}: record {record} has {int(lengths[longest])} bytes, more than "
                    f"{READ_BUDGET_ENV} ({self._budget}) lets one record take",
                    record=record,
                )
        data = b""
        if count:
            begin = int(spans[0, 0])
            with open_shard(path) as f:
                f.seek(begin)
                data = f.read(int(spans[-1, 1]) - begin)
            if len(data) != int(spans[-1, 1]) - begin:
                raise DecodeError(f"{path}: truncated before record {start + count - 1}")
        columns: dict[str, list[Any]] = {f.name: [] for f in idx.schema}
        base = int(spans[0, 0]) if count else 0
        for i, (b, e) in enumerate(spans.tolist()):
            record = start + i
            doc = _parse(path, data[b - base : e - base], record, self._budget)
            for spec in idx.schema:
                columns[spec.name].append(_value(path, spec, doc, record))
        return {spec.name: _column(spec, columns[spec.name]) for spec in idx.schema}


def _column(spec: FieldSpec, values: list[Any]) -> Any:
    if spec.dtype in TEXT_DTYPES:
        return Ragged.from_bytes(values)
    if spec.ragged:
        return Ragged.from_items(values, spec.dtype, spec.inner)
    if not values:
        return np.empty((0, *spec.shape), spec.dtype)
    return np.stack(values).astype(spec.dtype, copy=False)
