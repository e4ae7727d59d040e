"""Rebatching: pieces of any length in, batches of exactly `batch_size` out.

A piece is a dict of arrays sharing their first (record) dimension. A batch
that lies inside one piece is a view of it (no copy); a batch spanning pieces
is gathered with one copy. Views of received messages are read-only.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray[Any, Any]]


def piece_len(piece: Batch) -> int:
    return len(next(iter(piece.values())))


class Rebatcher:
    """Cuts a stream of pieces into batches of `batch_size` (the last may be shorter)."""

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._batch_size = batch_size
        self._pieces: deque[Batch] = deque()
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Records held that do not yet make a batch."""
        return self._buffered

    def push(self, piece: Batch) -> list[Batch]:
        """Add a piece; return the batches it completes."""
        n = piece_len(piece)
        if n == 0:
            return []
        self._pieces.append(piece)
        self._buffered += n
        out = []
        while self._buffered >= self._batch_size:
            out.append(self._cut(self._batch_size))
        return out

    def flush(self) -> Batch | None:
        """The last, partial batch, if any records remain."""
        if self._buffered == 0:
            return None
        return self._cut(self._buffered)

    def _cut(self, size: int) -> Batch:
        first = self._pieces[0]
        if piece_len(first) == size:  # zero-copy: a piece that is exactly one batch
            self._pieces.popleft()
            self._buffered -= size
            return first
        parts: list[Batch] = []
        need = size
        while need:
            piece = self._pieces[0]
            n = piece_len(piece)
            if n <= need:
                parts.append(self._pieces.popleft())
                need -= n
            else:
                parts.append({k: v[:need] for k, v in piece.items()})
                self._pieces[0] = {k: v[need:] for k, v in piece.items()}
                need = 0
        self._buffered -= size
        if len(parts) == 1:  # a view of one piece: still no copy
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
