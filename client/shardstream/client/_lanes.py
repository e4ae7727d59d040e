"""The client's side of a same-host lane (the worker's: `shardstream.server._lanes`).

    lane = await open_lane(conn.stub)       # None where the worker is on another host
    stream = lane.new_stream()              # names a read: ReadRequest.lane_stream
    message = lane.take(slot, size, stream) # a SharedChunk's message, in place
    lane.end(stream)                        # the read is over

A lane works only where the worker's abstract Unix socket is reachable: the same
host and network namespace. Anywhere else (another node, another container
without a shared network namespace, a worker with lanes off) opening fails and
the reads go as bytes on the gRPC stream, as they always can.

A chunk is parsed where it lies: its arrays (read-only) view the slot, and the
slot goes back to the worker when the last of them is gone (a finalizer on the
message's array; batches cut across chunks are copies, which free their chunks
at once). So the worker never writes a slot an array still views; a consumer
that keeps batches keeps slots, and the chunks that find none go as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
import time
import weakref
from typing import Any

import grpc
import numpy as np

from shardstream.client._wire import LaneOffer, WorkerStub

log = logging.getLogger("shardstream.client")

__all__ = ["ClientLane", "open_lane"]

_RELEASE, _END = 1, 2  # control records: (kind, value, count), little-endian uint32s
_RECORD = struct.Struct("<III")
CONNECT_SECONDS = 5.0
MAX_LANE_BYTES = 1 << 40  # a lane offered larger than this is refused (a broken worker)


class ClientLane:
    """An open lane: the worker's slots mapped here and the control socket."""

    def __init__(self, lane: str, memory: mmap.mmap, slots: int, slot_bytes: int,
                 sock: socket.socket) -> None:  # fmt: skip
        self.id = lane
        self._memory: mmap.mmap | None = memory
        self._view: memoryview | None = memoryview(memory)
        self._mapping = weakref.ref(memory)  # gone once nothing here or in arrays holds it
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._sock = sock
        self._streams = 0
        self._received: dict[int, int] = {}  # per read running: its chunks that arrived
        self._held: set[int] = set()  # slots arrays here still view (not handed back)
        self._lock = threading.Lock()
        self.alive = True
        self._pid = os.getpid()  # a forked child must not hand back the parent's slots
        self.bytes = 0  # chunk bytes that came through the lane

    def new_stream(self) -> int:
        self._streams = (self._streams + 1) % (1 << 32)
        self._received[self._streams] = 0
        return self._streams

    def take(self, slot: int, size: int, stream: int) -> np.ndarray[Any, Any]:
        """The message in `slot` (its first `size` bytes) of read `stream`, in place: a
        read-only uint8 array over the slot, which is handed back to the worker once that
        array and every array viewing it are gone. ValueError for a slot or size outside
        the lane (a broken worker)."""
        if not 0 <= slot < self._slots or not 0 < size <= self._slot_bytes:
            raise ValueError(
                f"a shared chunk in slot {slot} of {size} bytes, outside the lane's "
                f"{self._slots} slots of {self._slot_bytes} bytes"
            )
        with self._lock:
            view = self._view
            if view is None:
                raise RuntimeError(
                    f"a chunk taken from the same-host lane {self.id[:4]} after close"
                )
            if slot in self._held:  # the worker wrote over records handed out from it
                raise ValueError(
                    f"a shared chunk in slot {slot}, which this loader had not handed back: "
                    "the worker wrote a slot that batches already delivered still view"
                )
            self._held.add(slot)
        if stream in self._received:
            self._received[stream] += 1
        start = slot * self._slot_bytes
        message = np.frombuffer(view[start : start + size].toreadonly(), np.uint8)
        weakref.finalize(message, self._release, slot)
        self.bytes += size
        return message

    def _release(self, slot: int) -> None:
        with self._lock:
            self._held.discard(slot)  # before the worker can hear of it
        self._send(_RELEASE, slot)

    def end(self, stream: int) -> None:
        """The read `stream` is over: the worker frees the slots it sent that never
        arrived (those that did are handed back as their arrays go)."""
        self._send(_END, stream, self._received.pop(stream, 0))

    def _send(self, kind: int, value: int, count: int = 0) -> None:
        # From any thread: the last reference to a batch may go in the training loop's.
        with self._lock:
            if not self.alive or os.getpid() != self._pid:
                return
            try:
                self._sock.send(_RECORD.pack(kind, value, count))
            except OSError as exc:  # gone, or not reading: the lane ends, reads go as bytes
                self._close(f"its socket failed: {exc}")

    @property
    def mapped(self) -> bool:
        """Whether the lane's memory is still mapped in this process."""
        memory = self._mapping()
        return memory is not None and not memory.closed

    def close(self, why: str = "the loader closed") -> None:
        """End the lane (idempotent): the worker sees the socket close and frees it. The
        mapping goes now if no array views it (the worker counts the lane's memory for as
        long as this process maps it), else with the last of them: the lane lets go of
        it, so that only those arrays hold it, however long the closed loader lives."""
        with self._lock:
            self._close(why)
            if self._view is None or os.getpid() != self._pid:
                return
            if not self._held:
                try:
                    self._view.release()
                    self._memory.close()  # type: ignore[union-attr]
                except BufferError:  # an array of it the finalizers have not seen go yet
                    pass
            self._view = self._memory = None

    def _close(self, why: str) -> None:
        if self.alive:
            self.alive = False
            self._sock.close()
            log.debug("same-host lane %s closed: %s", self.id[:4], why)


async def open_lane(
    stub: WorkerStub, *, slots: int = 0, slot_bytes: int = 0, timeout: float = CONNECT_SECONDS
) -> ClientLane | None:
    """A lane of up to `slots` slots of `slot_bytes` (0: the worker's choice) to the
    worker behind `stub`, or None where it offers none or is not on this host (why is
    logged at debug level: that is the usual case across machines)."""
    try:
        offer = await stub.open_lane(timeout=timeout, slots=slots, slot_bytes=slot_bytes)
    except grpc.aio.AioRpcError as exc:
        log.debug("no same-host lane: %s %s", exc.code().name, exc.details())
        return None
    if not offer.address or len(offer.lane) != 16 or offer.slots < 1 or offer.slot_bytes < 1:
        log.debug("no same-host lane: the worker's offer is incomplete")
        return None
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _connect, offer, timeout)
    except (OSError, ValueError) as exc:  # another host or network namespace, mostly
        log.debug("no same-host lane to %s: %s", offer.address, exc)
        return None


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _check_memory(fd: int, size: int) -> None:
    """The lane's memory must hold `size` bytes and be sealed against shrinking: a file
    cut under a mapping makes reading it SIGBUS, which no check could catch later."""
    if size > MAX_LANE_BYTES:
        raise ValueError(f"the offered lane of {size} bytes is larger than {MAX_LANE_BYTES}")
    if os.fstat(fd).st_size < size:
        raise ValueError(f"the lane's memory is smaller than the {size} bytes offered")
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
        raise ValueError("the lane's memory is not sealed against shrinking")


def _connect(offer: LaneOffer, timeout: float) -> ClientLane:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect("\0" + offer.address)
                break
            except BlockingIOError:  # its queue is full (a flood, or many loaders at once)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)  # the worker accepts (and closes the idle) in the meantime
        sock.sendall(offer.lane.encode("ascii") + offer.ticket)
        message, fds, _, _ = socket.recv_fds(sock, 1, 1)
        if message != b"\1" or len(fds) != 1:
            for fd in fds:
                with contextlib.suppress(OSError):
                    socket.close(fd)
            raise ValueError("the worker refused the ticket")
        size = offer.slots * offer.slot_bytes
        try:
            _check_memory(fds[0], size)
            memory = mmap.mmap(fds[0], size, prot=mmap.PROT_READ)
        finally:
            socket.close(fds[0])
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    log.debug("same-host lane %s open: %d slots of %d bytes", offer.lane[:4], offer.slots,
              offer.slot_bytes)  # fmt: skip
    return ClientLane(offer.lane, memory, offer.slots, offer.slot_bytes, sock)
