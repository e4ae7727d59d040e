"""A byte range of a deflate stream (a compressed zip member), in bounded memory.

    stream = Deflated(offset=..., size=..., inflated=..., crc=...)
    positions = Positions(16)
    inflate_into(file, stream, begin, out, positions=positions, key=..., step=1 << 20)

`inflate_into` inflates from the start of the stream, or from the furthest point
at or before `begin` where an earlier call stopped (kept in `positions`),
discards up to `begin`, then inflates `len(out)` bytes straight into `out`, at
most `step` bytes at a time: whatever the stream declares, a call holds one step
of output and one block of input besides `out`, and a run of consecutive reads
inflates the stream once. A call that reaches the end of the stream checks its
CRC-32 (so `inflate_into(f, stream, stream.inflated, memoryview(b""), ...)`
checks a whole stream, holding one step). Errors are `InflateError`, carrying
the offset (in the inflated bytes) where they were found, for the caller to
name the record.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import IO, Any

__all__ = ["Deflated", "InflateError", "Positions", "inflate_into"]

_BLOCK = 64 * 1024  # compressed bytes read from the file at a time


class InflateError(Exception):
    """The compressed data is corrupt, cut short or not what it declares."""

    def __init__(self, message: str, *, at: int | None) -> None:
        super().__init__(message)
        self.at = at  # offset in the inflated stream where it was found; None: anywhere


@dataclass(frozen=True, slots=True, kw_only=True)
class Deflated:
    """Where a raw deflate stream lies in a file, and what it declares."""

    offset: int  # file offset of the compressed bytes
    size: int  # compressed bytes
    inflated: int  # bytes it inflates to, as declared
    crc: int  # CRC-32 of the inflated bytes, as declared


@dataclass(slots=True)
class _Position:
    z: Any  # a zlib decompress object
    fed: int = 0  # compressed bytes handed to `z` (some may wait in z.unconsumed_tail)
    at: int = 0  # inflated bytes produced
    crc: int = 0  # CRC-32 of those bytes


class Positions:
    """Where earlier calls stopped in their streams: the `limit` most recent (each holds
    a decompressor, ~50 KiB, and at most one block of unconsumed input)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[tuple[Hashable, int], _Position] = OrderedDict()

    def take(self, key: Hashable, at: int) -> _Position | None:
        """Remove and return the furthest position of stream `key` at or before `at`."""
        best = max((k[1] for k in self._items if k[0] == key and k[1] <= at), default=None)
        return None if best is None else self._items.pop((key, best))

    def put(self, key: Hashable, position: _Position) -> None:
        self._items[(key, position.at)] = position
        self._items.move_to_end((key, position.at))
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def inflate_into(
    f: IO[bytes],
    stream: Deflated,
    begin: int,
    out: memoryview,
    *,
    positions: Positions | None,
    key: Hashable,
    step: int,
) -> None:
    """Inflated bytes [begin, begin + len(out)) of `stream` into `out` (bytes, writable)."""
    end = begin + out.nbytes
    if not 0 <= begin <= end <= stream.inflated:
        raise ValueError(f"[{begin}, {end}) is outside the stream's {stream.inflated} bytes")
    found = positions.take(key, begin) if positions is not None else None
    pos = found or _Position(zlib.decompressobj(-zlib.MAX_WBITS))
    _inflate(f, stream, pos, begin - pos.at, None, step)
    _inflate(f, stream, pos, out.nbytes, out, step)
    if pos.at == stream.inflated:
        if pos.crc != stream.crc:
            raise InflateError(
                f"its CRC-32 is {pos.crc:08x}, the zip declares {stream.crc:08x}: its data "
                "is corrupt",
                at=None,
            )
    elif positions is not None:
        positions.put(key, pos)


def _inflate(
    f: IO[bytes], stream: Deflated, pos: _Position, n: int, out: memoryview | None, step: int
) -> None:
    """The next `n` inflated bytes: into `out`, or discarded when `out` is None."""
    done = 0
    while done < n:
        data = pos.z.unconsumed_tail
        if not data and pos.fed < stream.size:
            f.seek(stream.offset + pos.fed)
            data = f.read(min(_BLOCK, stream.size - pos.fed))
            if not data:
                raise InflateError("the file ends inside its compressed data", at=pos.at)
            pos.fed += len(data)
        try:
            chunk = pos.z.decompress(data, min(n - done, step))
        except zlib.error as e:
            raise InflateError(f"its compressed data is corrupt ({e})", at=pos.at) from None
        if not chunk:
            if pos.z.eof or not data:
                raise InflateError(
                    f"its compressed data ends after {pos.at} of the {stream.inflated} bytes "
                    "it declares",
                    at=pos.at,
                )
            continue
        pos.crc = zlib.crc32(chunk, pos.crc)
        if out is not None:
            out[done : done + len(chunk)] = chunk
        pos.at += len(chunk)
        done += len(chunk)
