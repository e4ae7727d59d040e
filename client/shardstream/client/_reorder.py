"""Reordering: chunks of many concurrent reads in, one plan-ordered stream out.

A small pure class keyed by read sequence number. Reads may complete in any
order; the chunks of one read arrive in record order (a resumed read goes on
from the first record not yet received). Anything else is a bug or a stale
stream and raises `ReorderError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from shardstream.client.errors import ReorderError

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Releases items in (read seq, offset) order; holds at most `window` reads open.

    `counts[seq]` is the number of records read `seq` brings; or `counts` is just the
    number of reads, and each read's count is given by `expect(seq, count)` when it
    starts (memory then stays within the window, whatever the plan's length). `put`
    accepts an item of `n` records at `offset` within its read; `pop` returns the items
    that are next in plan order.
    """

    def __init__(self, counts: Sequence[int] | int, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self._total = counts if isinstance(counts, int) else len(counts)
        self._counts: dict[int, int] = {} if isinstance(counts, int) else dict(enumerate(counts))
        self._window = window
        self._received: dict[int, int] = {}
        self._pending: dict[int, deque[tuple[int, T]]] = {}
        self._head = 0  # first read not yet fully released
        self._released = 0  # records of the head read already released

    @property
    def head(self) -> int:
        """Sequence number of the first read not yet fully released."""
        return self._head

    @property
    def done(self) -> bool:
        return self._head >= self._total

    def expect(self, seq: int, count: int) -> None:
        """Read `seq` brings `count` records (before any of them is put)."""
        if not 0 <= seq < self._total:
            raise ReorderError(f"read {seq} is not in the plan ({self._total} reads)")
        if seq < self._head or self._received.get(seq, 0):
            raise ReorderError(f"read {seq} is already under way")
        self._counts[seq] = count

    def widen(self, window: int) -> None:
        """Hold at least `window` reads open (a shuffle window needs all of its reads)."""
        self._window = max(self._window, window)

    def depth(self) -> int:
        """Items held, waiting for an earlier read."""
        return sum(len(q) for q in self._pending.values())

    def admits(self, seq: int) -> bool:
        """Whether read `seq` may be started now (it is within the window)."""
        return seq < self._head + self._window

    def received(self, seq: int) -> int:
        """Records of read `seq` received so far: where a resumed read starts."""
        return self._received.get(seq, 0)

    def put(self, seq: int, offset: int, n: int, item: T) -> None:
        if not 0 <= seq < self._total:
            raise ReorderError(f"read {seq} is not in the plan ({self._total} reads)")
        if not self.admits(seq):
            raise ReorderError(f"read {seq} is past the window (head {self._head})")
        count = self._counts.get(seq)
        if count is None and seq < self._head:
            raise ReorderError(  # its count is forgotten: a duplicate or an overrun
                f"read {seq}: {n} records at {offset}: a duplicate or overrun of a complete read"
            )
        if count is None:
            raise ReorderError(f"read {seq}: records of a read not started")
        expected = self._received.get(seq, 0)
        if offset != expected:
            kind = "duplicate" if offset < expected else "gap"
            raise ReorderError(
                f"read {seq}: {kind}: got records from {offset}, expected {expected}"
            )
        if n < 1 or expected + n > count:
            raise ReorderError(f"read {seq}: {n} records at {offset} overrun its {count} records")
        self._received[seq] = expected + n
        self._pending.setdefault(seq, deque()).append((n, item))

    def pop(self, limit: int | None = None) -> list[T]:
        """Items now next in plan order (possibly none; at most `limit`). A read's slot in
        the window is freed only once all of its items have been popped."""
        out: list[T] = []
        while not self.done and (limit is None or len(out) < limit):
            queue = self._pending.get(self._head)
            while queue and (limit is None or len(out) < limit):
                n, item = queue.popleft()
                self._released += n
                out.append(item)
            count = self._counts.get(self._head)
            if count is None or self._released < count:
                break
            self._pending.pop(self._head, None)
            self._counts.pop(self._head, None)
            self._received.pop(self._head, None)
            self._head += 1
            self._released = 0
        return out
