"""Ragged fields in the batches a consumer gets (`LoaderConfig.ragged`, `pad_to`).

Inside the pipeline a ragged field is a `Ragged` (values + offsets), so that
rebatching and shuffling cut and gather records like any other field. The
consumer gets plain arrays (or lists), as the loader's `ragged` option says:

- "pad" (default): a numeric ragged field `NAME` becomes an array
  (batch, L, *inner) padded with zeros, L the longest record of the batch (or
  `pad_to`, longer records truncated), plus `NAME_lengths` (int64, batch):
  each record's length in it. A "string" field becomes a `list[str]`, a
  "bytes" field a `list[bytes]`.
- "flat": `NAME` is the records' values one after another, (total, *inner)
  (uint8 bytes for text), and `NAME_offsets` (int64, batch + 1) cuts them:
  record i is `NAME[NAME_offsets[i]:NAME_offsets[i + 1]]`. No copy where the
  batch lies in one received chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from shardstream.v1.codec import TEXT_DTYPES, FieldSpec, storage_dtype
from shardstream.v1.ragged import Ragged

__all__ = [
    "RaggedMode",
    "batch_nbytes",
    "batch_records",
    "empty_batch",
    "extra_names",
    "format_batch",
]

RaggedMode = Literal["pad", "flat"]


def empty_batch(schema: tuple[FieldSpec, ...]) -> dict[str, Any]:
    """A zero-record batch of the schema, as the pipeline holds batches."""
    return {
        f.name: Ragged.empty(storage_dtype(f.dtype), f.inner)
        if f.ragged
        else np.empty((0, *f.shape), dtype=f.dtype)
        for f in schema
    }


def extra_names(schema: tuple[FieldSpec, ...], mode: RaggedMode) -> dict[str, str]:
    """The arrays a batch adds for ragged fields: {added name: its field}."""
    out = {}
    for f in schema:
        if f.ragged and mode == "flat":
            out[f"{f.name}_offsets"] = f.name
        elif f.ragged and f.dtype not in TEXT_DTYPES:
            out[f"{f.name}_lengths"] = f.name
    return out


def batch_nbytes(batch: Mapping[str, Any]) -> int:
    """Bytes a batch's arrays hold (`Ragged`: values and offsets)."""
    return sum(int(getattr(v, "nbytes", 0)) for v in batch.values())


def batch_records(batch: Mapping[str, Any]) -> int:
    """Records in a batch as the consumer gets it (a flat ragged field's values are not
    one per record: its `NAME_offsets` counts them)."""
    for name, value in batch.items():
        if name.endswith("_offsets") and name[: -len("_offsets")] in batch:
            return len(value) - 1
    return len(next(iter(batch.values())))


def format_batch(
    batch: dict[str, Any],
    schema: tuple[FieldSpec, ...],
    mode: RaggedMode,
    pad_to: int | None,
) -> dict[str, Any]:
    """A pipeline batch as the consumer gets it (see the module docstring)."""
    if not any(isinstance(v, Ragged) for v in batch.values()):
        return batch
    text = {f.name: f.dtype for f in schema if f.dtype in TEXT_DTYPES}
    out: dict[str, Any] = {}
    for name, column in batch.items():
        if not isinstance(column, Ragged):
            out[name] = column
        elif mode == "flat":
            out[name] = column.values
            offsets = column.offsets
            out[f"{name}_offsets"] = offsets - offsets[0] if offsets[0] else offsets
        elif name in text:
            out[name] = _texts(column, text[name] == "string")
        else:
            out[name], out[f"{name}_lengths"] = _padded(column, pad_to)
    return out


def _texts(column: Ragged, decode: bool) -> list[Any]:
    data = column.values.tobytes()
    bounds = (column.offsets - column.offsets[0]).tolist()
    items = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return [b.decode("utf-8") for b in items] if decode else items


def _padded(
    column: Ragged, pad_to: int | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, np.dtype[np.int64]]]:
    lengths = column.lengths
    width = int(lengths.max(initial=0)) if pad_to is None else pad_to
    kept = np.minimum(lengths, width)
    values = column.values
    out = np.zeros((len(column), width, *values.shape[1:]), values.dtype)
    mask = np.arange(width)[None, :] < kept[:, None]
    if pad_to is not None and bool((lengths > width).any()):  # truncated: gather kept items
        ends = np.cumsum(kept)
        within = np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(ends - kept, kept)
        values = values[np.repeat(column.offsets[:-1] - column.offsets[0], kept) + within]
    out[mask] = values
    return out, kept
