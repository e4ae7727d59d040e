"""The epoch's global sequence as a seeded permutation of blocks, worked out per index.

A block is `size` consecutive records of one shard (a shard's last block may be
shorter; an empty shard has none). Blocks are numbered shard by shard; the
epoch puts them in the order of a pseudo-random permutation keyed by (seed,
epoch), so consecutive blocks come from different shards:

    blocks:  [ 0.0 | 0.1 | 0.2 | 1.0 | 1.1 | 2.0 ]    (shard.block)
    epoch:   [ 1.1 | 0.2 | 2.0 | 0.0 | 1.0 | 0.1 ]    (position -> block: `Feistel`)

Nothing is listed per block: the permutation is a Feistel network over the
next power of four, cycle-walked into [0, n) (a bijection whose both
directions cost a few hashes), and positions are found from the blocks shorter
than `size`, of which there is at most one per shard. A layout costs in
proportion to the shards, whatever the number of records.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's multipliers
_M2 = np.uint64(0x94D049BB133111EB)


class Feistel:
    """A bijection of [0, n) keyed by `key` (ints): `forward`, and `inverse` undoing it.
    Vectorised: both take and return int64 arrays (or anything numpy makes one of)."""

    def __init__(self, n: int, key: Sequence[int]) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self._half = max(1, -(-max(1, (n - 1).bit_length()) // 2))  # 4**half >= n
        self._mask = np.uint64((1 << self._half) - 1)
        state = np.random.SeedSequence([*key]).generate_state(_ROUNDS, np.uint64)
        self._keys = [np.uint64(k) for k in state]

    def _f(self, r: int, x: np.ndarray) -> np.ndarray:
        z = x ^ self._keys[r]
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return (z ^ (z >> np.uint64(31))) & self._mask

    def _round_trip(self, x: np.ndarray, *, back: bool) -> np.ndarray:
        h = np.uint64(self._half)
        left, right = x >> h, x & self._mask
        if back:
            for r in reversed(range(_ROUNDS)):
                left, right = right ^ self._f(r, left), left
        else:
            for r in range(_ROUNDS):
                left, right = right, left ^ self._f(r, right)
        return (left << h) | right

    def _walk(self, values: object, *, back: bool) -> np.ndarray:
        x = np.array(values, dtype=np.uint64, ndmin=1)
        out = self._round_trip(x, back=back)
        n = np.uint64(self.n)
        while (outside := out >= n).any():  # cycle walking: on average under 4 steps
            out[outside] = self._round_trip(out[outside], back=back)
        return out.astype(np.int64)

    def forward(self, values: object) -> np.ndarray:
        return self._walk(values, back=False)

    def inverse(self, values: object) -> np.ndarray:
        return self._walk(values, back=True)


class BlockLayout:
    """One pass of an epoch's global sequence: the blocks of `size` records in the order
    of a (seed, epoch) permutation. `index(p)`: the block at position p; `offset(k)`:
    where block k starts; `block(k)`: (shard, start in the shard, records)."""

    def __init__(self, counts: Sequence[int], size: int, key: Sequence[int]) -> None:
        self.counts = tuple(counts)
        self.size = size
        self.first = [0]  # number of each shard's first block, then the number of blocks
        for c in self.counts:
            self.first.append(self.first[-1] + -(-c // size))
        self.n = self.first[-1]
        self.total = sum(self.counts)
        self.perm = Feistel(self.n, key)
        short = [  # (block number, records missing) of blocks shorter than `size`
            (self.first[s + 1] - 1, size - c % size) for s, c in enumerate(self.counts) if c % size
        ]
        where = [int(k) for k in self.perm.inverse([b for b, _ in short])] if short else []
        pairs = sorted(zip(where, (d for _, d in short), strict=True))
        self._short: list[int] = [k for k, _ in pairs]  # positions (in blocks) of the short blocks
        self._missing = [0]  # records missing before each of them, then in all
        for _, d in pairs:
            self._missing.append(self._missing[-1] + d)
        # Where each short block starts (records): positions are found between them.
        self._starts = [k * size - m for k, m in zip(self._short, self._missing, strict=False)]

    def offset(self, k: int) -> int:
        """Position of block k's first record (k == n: the total)."""
        j = bisect.bisect_left(self._short, k)
        return k * self.size - self._missing[j]

    def index(self, p: int) -> int:
        """The block holding position p, in [0, total)."""
        i = bisect.bisect_right(self._starts, p) - 1
        if i < 0:
            return p // self.size
        k, end = (
            self._short[i],
            self._starts[i] + self.size - (self._missing[i + 1] - self._missing[i]),
        )
        return k if p < end else k + 1 + (p - end) // self.size

    def block(self, k: int) -> tuple[int, int, int]:
        """(shard, first record in the shard, records) of block k."""
        b = int(self.perm.forward(k)[0])
        s = bisect.bisect_right(self.first, b) - 1
        start = (b - self.first[s]) * self.size
        return s, start, min(self.size, self.counts[s] - start)


__all__ = ["BlockLayout", "Feistel"]
