"""Shared memory between the server process and its decoding processes.

A decoding process serializes each chunk straight into a slot of a block of
shared memory (one copy, from the decoded arrays); the server process copies it
out once into the message it sends and frees the slot. Compared with returning
the chunk through the process's pipe, this saves pickling and two copies through
the kernel for every chunk. The number of slots bounds the chunks in flight
between the processes, so it also bounds that memory: at most `count * size`
bytes, of which only the pages chunks have touched are ever allocated.

The block is anonymous memory (`memfd_create`), shared by descriptor: the
server passes it to each decoding process it spawns (`BlockHandle`, an argument
of the spawned process, pickled as a descriptor that travels with the spawn).
It has no name anywhere, so nothing is left behind whatever is killed: the
memory is freed with the last process that maps it, and decoding processes die
with their server. It is not in `/dev/shm` either, so that tmpfs's size (Docker
gives containers 64 MiB) does not limit it; it counts towards the worker's own
memory (its cgroup), like the rest of its buffers.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen
from typing import Any

__all__ = ["BlockHandle", "ChunkBuffers", "attach", "slot"]


class BlockHandle:
    """What a decoding process needs to map a block: its descriptor and geometry.

    Picklable only as the argument of a process being spawned: the descriptor
    then travels with the spawn (`multiprocessing.reduction.DupFd`)."""

    def __init__(self, fd: int, count: int, size: int) -> None:
        self.fd = fd
        self.count = count
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        if get_spawning_popen() is None:
            raise TypeError("a BlockHandle can only be passed to a process being spawned")
        return (_rebuild_handle, (reduction.DupFd(self.fd), self.count, self.size))


def _rebuild_handle(fd: Any, count: int, size: int) -> BlockHandle:
    return BlockHandle(fd.detach(), count, size)


_block: memoryview | None = None  # this decoding process's map of the server's block
_slot_size = 0


def attach(handle: BlockHandle) -> None:
    """Map the server's block in this process (a decoding process, at start-up)."""
    global _block, _slot_size
    mapped = mmap.mmap(handle.fd, handle.count * handle.size)  # holds its own descriptor
    _block, _slot_size = memoryview(mapped), handle.size


def slot(index: int) -> memoryview:
    """Slot `index` of the block this process attached."""
    if _block is None:
        raise RuntimeError("no shared-memory block is attached in this process")
    return _block[index * _slot_size : (index + 1) * _slot_size]


class ChunkBuffers:
    """`count` slots of `size` bytes (rounded up to whole pages, so that every slot, and
    the tensors aligned within its message, start aligned in memory), handed out and
    returned (server process side)."""

    def __init__(self, count: int, size: int) -> None:
        if count < 1 or size < 1:
            raise ValueError(f"count and size must be positive, got {count} and {size}")
        self._count = count
        self._size = size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.memfd_create("shardstream-chunks", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, count * size)  # sparse: pages are allocated when first written
            self._map = mmap.mmap(fd, count * size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            self._free.put_nowait(i)

    @property
    def capacity(self) -> int:
        """Bytes of shared memory at most (`count * size`)."""
        return self._count * self._size

    def handle(self) -> BlockHandle:
        """The block, for a decoding process (see `attach`)."""
        if self._fd < 0:
            raise RuntimeError("the chunk buffers are closed")
        return BlockHandle(self._fd, self._count, self._size)

    async def acquire(self) -> int:
        return await self._free.get()

    def release(self, index: int) -> None:
        self._free.put_nowait(index)

    def view(self, index: int, nbytes: int) -> memoryview:
        """The first `nbytes` of slot `index` (release it only once the view is gone)."""
        if not 0 <= nbytes <= self._size:
            raise ValueError(f"a chunk of {nbytes} bytes does not fit a slot of {self._size}")
        start = index * self._size
        return memoryview(self._map)[start : start + nbytes]

    def take(self, index: int, nbytes: int) -> bytes:
        """Copy a chunk out of slot `index` (the slot can then be reused)."""
        if not 0 <= nbytes <= self._size:
            raise ValueError(f"a chunk of {nbytes} bytes does not fit a slot of {self._size}")
        start = index * self._size
        return self._map[start : start + nbytes]

    def close(self) -> None:
        """Unmap (idempotent); the memory goes once no decoding process maps it either."""
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1
