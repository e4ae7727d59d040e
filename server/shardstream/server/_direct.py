"""Direct reads: a chunk whose records are file bytes, read into its message in place.

When a decoder says where a chunk's records lie in the shard's file, exactly as
the chunk carries them (`Decoder.byte_ranges`: npz members stored little-endian
in C order, no transform), there is nothing to decode. The server process then
builds the message itself: the protobuf headers are written and the records read
from the file (`preadv`) straight into the room left for them in the message, on
the event loop where every byte is in the page cache (`read_direct_now`: RWF_NOWAIT
never waits for a disk), else in one of its I/O threads. Compared with a decoding process filling a
shared-memory slot that the server copies out, that skips a process hop, the
pickled job and a copy of every byte.

gRPC Python sends only `bytes`, which are immutable: the message is made as an
uninitialised `bytes` of its size (`PyBytes_FromStringAndSize(NULL, n)`, as C
extensions do) and filled before any other code sees it. Where that is not
available (not CPython), `new_message` is None and every chunk is decoded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shardstream.server._decoding import decoder
from shardstream.server._files import GONE, ShardPath, Stamp, stat_stamp
from shardstream.server._lanes import send_by
from shardstream.server._wire import Region, fixed_layout, layout_size
from shardstream.server.errors import ShardChanged
from shardstream.v1.codec import FieldSpec

__all__ = [
    "LATER",
    "message_for",
    "new_message",
    "open_direct",
    "read_direct",
    "read_direct_into",
    "read_direct_now",
    "send_direct",
]

LATER = -1  # `read_direct_now`: some of the chunk is not in the page cache; read it in a thread
PIECE = 256 << 10  # bytes `send_direct` sends at a time (the socket is the kernel's meanwhile)


def _bytes_factory() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """`new_message(n)`: a new `bytes` of n unset bytes and a writable view of them."""
    if platform.python_implementation() != "CPython":
        return None
    make = ctypes.pythonapi.PyBytes_FromStringAndSize
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    offset = bytes.__basicsize__ - 1  # offsetof(PyBytesObject, ob_sval)

    def new(n: int) -> tuple[bytes, memoryview]:
        message: bytes = make(None, n)
        room = (ctypes.c_char * n).from_address(id(message) + offset)
        return message, memoryview(room).cast("B")

    message, view = new(5)  # the layout is what this module assumes, or it is not used
    view[:] = b"probe"
    ok = message == b"probe"
    del view
    return new if ok else None


new_message = _bytes_factory()


def read_direct(
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str = "",
) -> bytes | None:
    """The chunk `read_chunk` would make of records [start, start + count), read from the
    file into the message; None where the decoder gives no byte ranges (decode it)."""
    job = (ref, path, stamp, start, count, schema, shard_id)
    message, room = message_for(job)
    try:
        size = read_direct_into(room, *job)
    finally:
        room.release()
    return message if size is not None and size == len(message) else None


def message_for(job: tuple[Any, ...]) -> tuple[bytes, memoryview]:
    """A new message of the size the chunk of `job` (`read_direct`'s arguments) takes,
    unset, and a writable view of it for `read_direct_into`. The view does not keep the
    message alive: hold the message until the view is done with."""
    if new_message is None:
        return b"", memoryview(bytearray())
    _, _, _, start, count, schema, shard_id = job
    pieces = fixed_layout(start, count, schema, shard_id)
    return new_message(layout_size(pieces))


def read_direct_into(
    buffer: memoryview,
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str = "",
) -> int | None:
    """`read_direct` into the start of `buffer` (a new message: `message_for`; or a
    same-host lane's slot): the message's size, or None where the chunk needs decoding or
    does not fit."""
    return _read_into(buffer, (ref, path, stamp, start, count, schema, shard_id), 0)


def _read_into(buffer: memoryview, job: tuple[Any, ...], flags: int) -> int | None:
    """`read_direct_into`, `preadv` with `flags` (RWF_NOWAIT: BlockingIOError rather than
    wait for the disk)."""
    ref, path, stamp, start, count, schema, shard_id = job
    if not isinstance(path, os.PathLike):
        return None
    with _opened(path, stamp) as fd:
        planned = _plan(ref, path, start, count, schema, shard_id)
        if planned is None or planned[2] > len(buffer):
            return None
        pieces, ranges, size = planned
        _fill(fd, buffer[:size], pieces, ranges, flags)
        return size


_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def read_direct_now(buffer: memoryview, *job: Any) -> int | None:
    """`read_direct_into` if every byte of the chunk is in the page cache (`preadv` with
    RWF_NOWAIT: it never waits for a disk), for the event loop to call without a thread
    hop; LATER otherwise (not cached, or a file system that cannot tell)."""
    if not _NOWAIT:
        return LATER
    try:
        return _read_into(buffer, job, _NOWAIT)
    except BlockingIOError:
        return LATER
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return LATER
        raise


@contextlib.contextmanager
def _opened(path: os.PathLike[str], stamp: Stamp) -> Iterator[int]:
    """The shard's file, open, and the very file that was indexed (ShardChanged if not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except GONE as exc:
        raise ShardChanged(f"the shard cannot be opened any more: {_why(exc)}") from None
    try:
        if stat_stamp(os.fstat(fd)) != stamp:
            raise ShardChanged(
                "the shard changed since it was indexed; restart the worker to index it again"
            )
        yield fd
    finally:
        os.close(fd)


def _plan(
    ref: str,
    path: os.PathLike[str],
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str,
) -> tuple[list[bytes | Region], list[tuple[int, int]], int] | None:
    """The chunk's layout, each field's file range and the message's size; None where
    the decoder gives no byte ranges."""
    try:
        ranges = decoder(ref).byte_ranges(
            path if isinstance(path, Path) else Path(path), start, count
        )
    except GONE as exc:  # gone after the open
        raise ShardChanged(f"the shard cannot be opened any more: {_why(exc)}") from None
    if ranges is None or set(ranges) != {f.name for f in schema}:
        return None
    pieces = fixed_layout(start, count, schema, shard_id)
    return pieces, [ranges[f.name] for f in schema], layout_size(pieces)


def open_direct(
    job: tuple[Any, ...],
) -> tuple[int, Stamp, list[bytes | Region], list[tuple[int, int]], int] | None:
    """For a chunk sent straight from its file (a network lane, `send_direct`): its file
    open (the very file indexed, else ShardChanged), the chunk's layout, its fields' file
    ranges and its size; None where the chunk needs decoding. The caller closes the file."""
    ref, path, stamp, start, count, schema, shard_id = job
    if not isinstance(path, os.PathLike):
        return None
    with _opened(path, stamp) as fd:
        planned = _plan(ref, path, start, count, schema, shard_id)
        if planned is None:
            return None
        return os.dup(fd), stamp, *planned


def send_direct(
    fd: int,
    stamp: Stamp,
    pieces: list[bytes | Region],
    ranges: list[tuple[int, int]],
    sock: socket.socket,
    deadline: float,
) -> None:
    """(A sending thread.) The chunk's message onto `sock` (blocking), all of it by
    `deadline` (monotonic; TimeoutError past it): its headers as bytes, each field's
    records from the file by `sendfile`, which copies them from the page cache into the
    socket with no copy in this process. In pieces: the kernel holds the socket while it
    copies. ShardChanged where the file is shorter than it was, or changed (its stamp)
    while it was sent: the frame is then cut short or wrong, and the lane must end."""
    regions = iter(ranges)
    out = sock.fileno()
    headers = bytearray()
    for piece in pieces:
        if isinstance(piece, bytes):
            headers += piece
            continue
        if headers:
            send_by(sock, headers, deadline)
            headers.clear()
        offset, nbytes = next(regions)
        done = 0
        while done < nbytes:
            try:
                n = os.sendfile(out, fd, offset + done, min(PIECE, nbytes - done))
            except BlockingIOError:  # the socket's buffer is full: wait for room
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [out], [], left)[1]:
                    raise TimeoutError("the frame was not taken in time") from None
                continue
            if n <= 0:
                raise ShardChanged("the shard is shorter than when it was indexed")
            done += n
    if headers:
        send_by(sock, headers, deadline)
    if stat_stamp(os.fstat(fd)) != stamp:  # rewritten in place while it was sent
        raise ShardChanged(
            "the shard changed while a chunk of it was sent; restart the worker to index it"
        )


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _fill(
    fd: int,
    view: memoryview,
    pieces: list[bytes | Region],
    ranges: list[tuple[int, int]],
    flags: int = 0,
) -> None:
    """Headers into `view`, and each region from its file range (`preadv` flags)."""
    regions = iter(ranges)
    pos = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            view[pos : pos + len(piece)] = piece
            pos += len(piece)
            continue
        offset, nbytes = next(regions)
        assert nbytes == piece.nbytes
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[pos + done : pos + nbytes]], offset + done, flags)
            if n <= 0:
                raise ShardChanged("the shard is shorter than when it was indexed")
            done += n
        pos += nbytes
