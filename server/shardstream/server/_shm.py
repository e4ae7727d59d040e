"""Shared-memory buffers between the server process and its decoding processes.

A decoding process serializes each chunk straight into a buffer of its own
(one copy, from the decoded arrays); the server process copies it out once
into the message it sends and frees the buffer. Compared with returning the
chunk through the pool's pipe, this saves pickling and two copies through the
kernel for every chunk. The number of buffers bounds the chunks in flight
between the processes, so it also bounds that memory.
"""

from __future__ import annotations

import asyncio
from multiprocessing import shared_memory

_attached: dict[str, shared_memory.SharedMemory] = {}


def attach(name: str) -> memoryview:
    """A decoding process's view of a buffer (attached once per process)."""
    shm = _attached.get(name)
    if shm is None:
        # Spawned decoding processes share the server's resource tracker, so attaching
        # registers the block again there (a no-op: the server created it and unlinks it).
        # Unregistering here would drop the server's own registration, and its unlink
        # would then make the tracker print a KeyError at shutdown.
        shm = shared_memory.SharedMemory(name=name)
        _attached[name] = shm
    buf = shm.buf
    assert buf is not None
    return buf


class ChunkBuffers:
    """`count` buffers of `size` bytes, handed out and returned (server process side)."""

    def __init__(self, count: int, size: int) -> None:
        self._blocks = [shared_memory.SharedMemory(create=True, size=size) for _ in range(count)]
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            self._free.put_nowait(i)

    def name(self, index: int) -> str:
        return self._blocks[index].name

    async def acquire(self) -> int:
        return await self._free.get()

    def release(self, index: int) -> None:
        self._free.put_nowait(index)

    def take(self, index: int, nbytes: int) -> bytes:
        """Copy a chunk out of buffer `index` (the buffer can then be reused)."""
        buf = self._blocks[index].buf
        assert buf is not None
        return bytes(buf[:nbytes])

    def close(self) -> None:
        for block in self._blocks:
            block.close()
            block.unlink()
        self._blocks = []
