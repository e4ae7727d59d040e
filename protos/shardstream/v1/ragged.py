"""`Ragged`: the values of a variable-length field for a run of records.

Worker and client hold a ragged field (`FieldSpec.ragged`: a first dimension of
-1, or a "string" / "bytes" field) as one array of all the records' values,
concatenated, plus offsets: record i is `values[offsets[i]:offsets[i + 1]]`.
On the wire that is a Tensor of shape (total, *inner) and its per-record
`lengths` (see `shardstream.proto`). Slicing a run of records views the values
(no copy); taking records in another order (a shuffle) gathers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Ragged", "concat", "take"]

Offsets = np.ndarray[Any, np.dtype[np.int64]]


class Ragged:
    """Records' variable-length values: `values` (total, *inner) and `offsets` (n + 1,),
    int64, starting at 0, non-decreasing, ending at `len(values)`."""

    __slots__ = ("offsets", "values")

    def __init__(self, values: np.ndarray[Any, Any], offsets: Offsets) -> None:
        self.values = values
        self.offsets = offsets

    @classmethod
    def from_lengths(cls, values: np.ndarray[Any, Any], lengths: np.ndarray[Any, Any]) -> Ragged:
        """From per-record lengths; ValueError unless they are non-negative and add up to
        the values' first dimension."""
        lengths = np.asarray(lengths)
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
        if len(lengths) and int(lengths.min()) < 0:
            bad = int(np.flatnonzero(lengths < 0)[0])
            raise ValueError(f"record {bad} has the negative length {int(lengths[bad])}")
        items = len(values) if values.ndim else 0
        if len(lengths) and int(lengths.max()) > items:  # else their sum may wrap around
            bad = int(np.flatnonzero(lengths > items)[0])
            raise ValueError(
                f"record {bad} has the length {int(lengths[bad])}, more than the {items} "
                "values there are"
            )
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if values.ndim == 0 or int(offsets[-1]) != len(values):
            raise ValueError(
                f"the lengths add up to {int(offsets[-1])}, but the values' first dimension "
                f"is {values.shape[0] if values.ndim else 'missing'}"
            )
        return cls(values, offsets)

    @classmethod
    def from_items(
        cls, items: Sequence[Any], dtype: np.dtype[Any] | str, inner: tuple[int, ...] = ()
    ) -> Ragged:
        """From one array-like per record, each of shape (n_i, *inner)."""
        arrays = [np.asarray(a, dtype=dtype).reshape(-1, *inner) for a in items]
        lengths = np.array([len(a) for a in arrays], np.int64)
        values = np.concatenate(arrays) if arrays else np.empty((0, *inner), dtype)
        return cls.from_lengths(values, lengths)

    @classmethod
    def from_bytes(cls, items: Sequence[bytes]) -> Ragged:
        """From one byte string per record (the uint8 values of a text field)."""
        lengths = np.fromiter((len(b) for b in items), np.int64, len(items))
        values = np.frombuffer(b"".join(items), np.uint8)
        return cls.from_lengths(values, lengths)

    @classmethod
    def empty(cls, dtype: np.dtype[Any] | str, inner: tuple[int, ...] = ()) -> Ragged:
        return cls(np.empty((0, *inner), dtype), np.zeros(1, np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        return np.diff(self.offsets)

    @property
    def dtype(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = self.values.dtype
        return dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.offsets.nbytes)

    def record(self, i: int) -> np.ndarray[Any, Any]:
        """Record i's values (a view)."""
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __getitem__(self, key: slice | np.ndarray[Any, Any]) -> Ragged:
        """A run of records (a slice, step 1: the values are a view) or records in any
        order (an integer array: gathered)."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a Ragged slice takes a run of records (step 1)")
            stop = max(start, stop)
            lo, hi = int(self.offsets[start]), int(self.offsets[stop])
            return Ragged(self.values[lo:hi], self.offsets[start : stop + 1] - lo)
        return take(self, np.asarray(key))

    def __repr__(self) -> str:
        return f"Ragged({len(self)} records, values {self.values.dtype}{list(self.values.shape)})"


# `take` gathers records of this many items on average one slice at a time; shorter
# ones with index arrays, over at most _GATHER_ITEMS items at once (8 bytes of index
# per item: gathering a window of 1-byte items at once took 30 times its size).
_SLICE_ITEMS = 256
_GATHER_ITEMS = 1 << 18


def take(ragged: Ragged, rows: np.ndarray[Any, Any]) -> Ragged:
    """Records `rows` (integer indices), in that order, gathered into new arrays."""
    rows = rows.astype(np.int64, copy=False)
    starts = ragged.offsets[:-1][rows]
    lengths = ragged.offsets[1:][rows] - starts
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = ragged.values
    out = np.empty((int(offsets[-1]), *values.shape[1:]), values.dtype)
    if int(offsets[-1]) >= _SLICE_ITEMS * len(rows):
        for s, n, o in zip(starts.tolist(), lengths.tolist(), offsets.tolist(), strict=False):
            out[o : o + n] = values[s : s + n]
        return Ragged(out, offsets)
    i = 0
    while i < len(rows):  # rows [i, j): at most _GATHER_ITEMS items, or one record
        lo = int(offsets[i])
        j = int(np.searchsorted(offsets, lo + _GATHER_ITEMS, side="right")) - 1
        j = min(len(rows), max(i + 1, j))
        hi = int(offsets[j])
        if j == i + 1:
            s = int(starts[i])
            out[lo:hi] = values[s : s + hi - lo]
        else:
            n = lengths[i:j]
            # each output item's index in `values`: its record's start + its place in it
            within = np.arange(hi - lo, dtype=np.int64) - np.repeat(offsets[i:j] - lo, n)
            out[lo:hi] = values[np.repeat(starts[i:j], n) + within]
        i = j
    return Ragged(out, offsets)


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate arrays (records along the first dimension) or `Ragged`s."""
    if parts and isinstance(parts[0], Ragged):
        values = np.concatenate([p.values for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Ragged(values, offsets)
    return np.concatenate(parts)
