"""Rebatching: pieces of any length in, batches of exactly `batch_size` out.

A piece is a dict of arrays sharing their first (record) dimension, or of
`Ragged` values (ragged fields: cut and joined by records the same way). A
batch that lies inside one piece is a view of it (no copy); a batch spanning
pieces is gathered with one copy. Views of received messages are read-only.

Batches are cut by *slots*: every planned record has a slot, also one that
was skipped as bad (a hole, pushed with a mask or `push_holes`). A hole leaves
its batch one record shorter, so batch boundaries, and therefore the number of
batches, never move.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstream.v1.ragged import concat

Batch = dict[str, Any]  # per field: an array (records first), or a `Ragged`
Mask = np.ndarray[Any, np.dtype[np.bool_]]


def piece_len(piece: Batch) -> int:
    return len(next(iter(piece.values())))


@dataclass(slots=True)
class _Part:
    arrays: Batch | None  # None: holes only
    mask: Mask | None  # which slots hold a record; None: all of them
    slots: int

    def split(self, n: int) -> tuple[_Part, _Part]:
        """The first `n` slots and the rest."""
        rows = n if self.mask is None else int(self.mask[:n].sum())
        arrays = self.arrays
        head = None if arrays is None else {k: v[:rows] for k, v in arrays.items()}
        tail = None if arrays is None else {k: v[rows:] for k, v in arrays.items()}
        if self.mask is None:
            return _Part(head, None, n), _Part(tail, None, self.slots - n)
        return _Part(head, self.mask[:n], n), _Part(tail, self.mask[n:], self.slots - n)


class Rebatcher:
    """Cuts a stream of pieces into batches of `batch_size` slots (the last may be shorter).

    `empty` is a zero-record batch (the schema's fields), used for a batch whose
    records were all skipped.
    """

    def __init__(self, batch_size: int, empty: Batch | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._batch_size = batch_size
        self._empty = empty
        self._parts: deque[_Part] = deque()
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Slots held that do not yet make a batch."""
        return self._buffered

    def push(self, piece: Batch, mask: Mask | None = None) -> list[Batch]:
        """Add a piece (with `mask`: its records fill the True slots); return completed batches."""
        return list(self.feed(piece, mask))

    def push_holes(self, n: int) -> list[Batch]:
        """Add `n` slots whose records were skipped."""
        return list(self.feed_holes(n))

    def feed(self, piece: Batch, mask: Mask | None = None) -> Iterator[Batch]:
        """`push`, the batches cut one at a time as they are asked for: a chunk of a
        million 1-byte records at batch_size 1 is not a million batches held at once.
        The piece is added at once; batches not asked for are cut by the next call."""
        rows = piece_len(piece)
        slots = rows if mask is None else len(mask)
        if mask is not None and int(mask.sum()) != rows:
            raise ValueError(f"mask marks {int(mask.sum())} records, the piece has {rows}")
        if self._empty is None and rows:
            self._empty = {k: v[:0] for k, v in piece.items()}
        self._add(_Part(piece if rows else None, mask, slots))
        return self._cuts()

    def feed_holes(self, n: int) -> Iterator[Batch]:
        """`push_holes`, cut as asked for (see `feed`)."""
        self._add(_Part(None, np.zeros(n, dtype=bool), n))
        return self._cuts()

    def flush(self) -> Batch | None:
        """The last, partial batch, if any slots remain."""
        if self._buffered == 0:
            return None
        return self._cut(self._buffered)

    def _add(self, part: _Part) -> None:
        if part.slots == 0:
            return
        self._parts.append(part)
        self._buffered += part.slots

    def _cuts(self) -> Iterator[Batch]:
        while self._buffered >= self._batch_size:
            yield self._cut(self._batch_size)

    def _cut(self, size: int) -> Batch:
        taken: list[Batch] = []
        need = size
        while need:
            part = self._parts[0]
            if part.slots <= need:
                self._parts.popleft()
            else:
                part, self._parts[0] = part.split(need)
            need -= part.slots
            if part.arrays is not None and piece_len(part.arrays):
                taken.append(part.arrays)
        self._buffered -= size
        if len(taken) == 1:  # inside one piece: a view, no copy
            return taken[0]
        if not taken:
            if self._empty is None:
                raise RuntimeError("a batch of skipped records only, and no schema to shape it")
            return dict(self._empty)
        return {k: concat([t[k] for t in taken]) for k in taken[0]}
