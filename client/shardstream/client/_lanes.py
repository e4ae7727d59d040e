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
import collections
import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import socket
import struct
import sys
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


class LaneClosedError(ConnectionError):
    """A lane ended while a read waited for, or took, a chunk in it."""


class _Releases:
    """Slots handed back from finalizers, which run wherever the garbage collector does,
    also inside this lane's own locked sections: a finalizer only queues its slot (no
    lock), and the queue is drained, under the lock, by the finalizer itself when the
    lock is free, else by the next take or end."""

    _lock: threading.Lock
    _held: set[int]
    _released: collections.deque[int]

    def _release(self, slot: int) -> None:
        self._released.append(slot)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """(`_lock` held.) Hand back every queued slot: RELEASE records to the worker."""
        while self._released:
            slot = self._released.popleft()
            self._held.discard(slot)  # before the worker can hear of it
            self._send_locked(_RELEASE, slot)

    _sock: socket.socket
    _pid: int
    _mapping: weakref.ref[mmap.mmap]
    _send_flags = 0  # of a control record's `send`
    alive: bool

    def _send_locked(self, kind: int, value: int, count: int = 0) -> None:
        """(`_lock` held; from any thread: the last reference to a batch may go in the
        training loop's.) One control record to the worker."""
        if not self.alive or os.getpid() != self._pid:
            return
        try:
            sent = self._sock.send(_RECORD.pack(kind, value, count), self._send_flags)
        except OSError as exc:  # gone, or not reading: the lane ends, reads go as bytes
            self._lost(f"its connection failed: {exc}")
            return
        if sent != _RECORD.size:  # a record cut short would misalign every later one
            self._lost("its connection took part of a control record")

    def _lost(self, why: str) -> None:
        """(`_lock` held.) End the lane: its connection failed."""
        raise NotImplementedError

    _received: dict[int, int]
    _slot_bytes: int
    _view: memoryview | None
    _memory: mmap.mmap | None
    bytes: int

    def _let_go(self) -> None:
        """(`_lock` held, the lane ended.) Unmap the lane's memory now if no array views
        it, else leave it to the last of them: the lane lets go of it either way."""
        if self._view is None:
            return
        if not self._held:
            try:
                self._view.release()
                self._memory.close()  # type: ignore[union-attr]
            except BufferError:  # an array of it the finalizers have not seen go yet
                pass
        self._view = self._memory = None

    def _hand_out(
        self, view: memoryview, slot: int, size: int, stream: int
    ) -> np.ndarray[Any, Any]:
        """The first `size` bytes of `slot` as a read-only array, a chunk of read `stream`;
        the slot is handed back once that array and every array viewing it are gone."""
        if stream in self._received:
            self._received[stream] += 1
        start = slot * self._slot_bytes
        message = np.frombuffer(view[start : start + size].toreadonly(), np.uint8)
        weakref.finalize(message, self._release, slot)
        self.bytes += size
        return message

    @property
    def mapped(self) -> bool:
        """Whether the lane's memory is still mapped in this process."""
        memory = self._mapping()
        return memory is not None and not memory.closed


class ClientLane(_Releases):
    """An open lane: the worker's slots mapped here and the control socket."""

    network = False

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
        self._released: collections.deque[int] = collections.deque()  # to hand back
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
            self._drain()
            view = self._view
            if view is None:
                raise LaneClosedError(f"the same-host lane {self.id[:4]} was closed")
            if slot in self._held:  # the worker wrote over records handed out from it
                raise ValueError(
                    f"a shared chunk in slot {slot}, which this loader had not handed back: "
                    "the worker wrote a slot that batches already delivered still view"
                )
            self._held.add(slot)
        return self._hand_out(view, slot, size, stream)

    def end(self, stream: int) -> None:
        """The read `stream` is over: the worker frees the slots it sent that never
        arrived (those that did are handed back as their arrays go)."""
        with self._lock:
            self._drain()
            self._send_locked(_END, stream, self._received.pop(stream, 0))

    def _lost(self, why: str) -> None:
        self._close(why)

    def close(self, why: str = "the loader closed") -> None:
        """End the lane (idempotent): the worker sees the socket close and frees it. The
        mapping goes now if no array views it (the worker counts the lane's memory for as
        long as this process maps it), else with the last of them: the lane lets go of
        it, so that only those arrays hold it, however long the closed loader lives."""
        with self._lock:
            self._close(why)
            if os.getpid() == self._pid:
                self._let_go()

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


# -- network lanes ---------------------------------------------------------------------

_FRAME = struct.Struct("<IIQQ")  # slot, read (lane stream), its place in the read, size
PIECE = 256 << 10  # bytes received at a time (the socket is the kernel's while it copies)
# Slots whose pages are made ready (MADV_POPULATE_WRITE, by a second thread) beyond the
# highest the worker has written: a frame into fresh memory otherwise takes its page
# faults inside the receiving thread's copy, where they cost 1.5x as much and are on the
# path of every byte (38% of that thread's time in a 300 MB epoch, measured). Nothing
# is taken before the first frame; then at most this many slots more than are used.
PREPARE_AHEAD = 1
# The kernel holds this process's memory-map lock while it takes pages, and a thread
# that maps memory meanwhile (a heap growing, a thread starting) waits for it: pages
# are taken a piece at a time, with a pause that lets such a thread in (its wait: at
# most about a millisecond, against 5-20 ms for a whole slot in one call, measured).
PREPARE_PIECE = 2 << 20
PREPARE_PAUSE = 50e-6  # seconds
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not in Python 3.11's mmap module


def _madvise_function() -> Any:
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_madvise = _madvise_function()  # a ctypes call: the GIL is let go while the kernel works


def _address(memory: mmap.mmap) -> int:
    """Where `memory` is mapped (its buffer exported only for this call)."""
    window = ctypes.c_char.from_buffer(memory)
    try:
        return ctypes.addressof(window)
    finally:
        del window


class NetworkLane(_Releases):
    """A network lane: the slots are this process's own memory, which the worker fills
    over a plain TCP connection beside the gRPC one (the server's `_lanes` says how).

    A thread receives each frame straight into its slot (one `recv`, no copy besides the
    kernel's), and the read's task, given the SharedChunk naming it, waits for that frame
    (`arrival`), then takes it in place as on a same-host lane (`take`): arrays view the
    slot, and it is handed back to the worker when the last of them is gone. A frame for a
    slot that arrays still view, or outside the lane, ends the lane (a broken worker); so
    does either side closing the connection, and the reads waiting for a chunk in it go on
    as bytes."""

    network = True
    _send_flags = socket.MSG_DONTWAIT  # (the socket blocks, for the receiving thread)

    def __init__(self, lane: str, slots: int, slot_bytes: int, sock: socket.socket) -> None:
        self.id = lane
        size = slots * slot_bytes
        # private and anonymous: pages are taken as frames are written, nothing is shared
        self._memory: mmap.mmap | None = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        self._view: memoryview | None = memoryview(self._memory)
        self._mapping = weakref.ref(self._memory)
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._sock = sock
        self._streams = 0
        self._received: dict[int, int] = {}  # per read running: its chunks taken
        self._held: set[int] = set()  # slots arrays here still view (not handed back)
        self._released: collections.deque[int] = collections.deque()  # to hand back
        self._filled: dict[int, tuple[int, int, int]] = {}  # slot: (read, place, size)
        self._waiters: dict[tuple[int, int, int], asyncio.Future[None]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self.alive = True
        self.why = ""
        self._pid = os.getpid()
        self.bytes = 0  # chunk bytes that came through the lane
        self._ready = 0  # slots whose pages are in (or written), from slot 0 (the
        self._ready_to = 0  # worker's first pick) ... wanted in up to here
        self._preparing = threading.Condition(self._lock)
        self._thread = threading.Thread(
            target=self._receive, name=f"shardstream-lane-{lane[:4]}", daemon=True
        )
        self._thread.start()  # (first: a lane without it is never made)
        self._preparer: threading.Thread | None = None
        if _madvise is not None:
            preparer = threading.Thread(
                target=self._prepare, name=f"shardstream-lane-{lane[:4]}-pages", daemon=True
            )
            with contextlib.suppress(RuntimeError):  # no thread: frames take their pages
                preparer.start()
                self._preparer = preparer

    def new_stream(self) -> int:
        self._streams = (self._streams + 1) % (1 << 32)
        self._received[self._streams] = 0
        return self._streams

    async def arrival(self, slot: int, stream: int) -> None:
        """Wait until the frame of read `stream`'s next chunk is in `slot`;
        LaneClosedError if the lane ends first."""
        key = (slot, stream, self._received.get(stream, 0))
        with self._lock:
            if self._view is None:
                raise LaneClosedError(self.why or "the lane was closed")
            if self._filled.get(slot, (-1, -1, 0))[:2] == key[1:]:
                return
            if not self.alive:
                raise LaneClosedError(self.why)
            future = self._waiters[key] = self._loop.create_future()
        try:
            await future
        finally:
            self._waiters.pop(key, None)

    def take(self, slot: int, size: int, stream: int) -> np.ndarray[Any, Any]:
        """The message of `size` bytes in `slot`, read `stream`'s next chunk (`arrival`
        has seen its frame), in place, as `ClientLane.take`. ValueError where the slot
        does not hold that frame (a broken worker)."""
        place = self._received.get(stream, 0)
        with self._lock:
            self._drain()
            view = self._view
            if view is None:
                raise LaneClosedError(f"the network lane {self.id[:4]} was closed")
            if self._filled.get(slot) != (stream, place, size):
                raise ValueError(
                    f"a network lane chunk in slot {slot} of {size} bytes, which does not "
                    "hold the frame the worker sent for it"
                )
            del self._filled[slot]
            self._held.add(slot)
        return self._hand_out(view, slot, size, stream)

    def end(self, stream: int) -> None:
        """The read `stream` is over: the worker frees the slots it sent that were never
        taken here (those that were are handed back as their arrays go)."""
        with self._lock:
            self._drain()
            for slot in [s for s, (read, _, _) in self._filled.items() if read == stream]:
                del self._filled[slot]
            self._send_locked(_END, stream, self._received.pop(stream, 0))

    def _lost(self, why: str) -> None:
        self._end(why)

    def close(self, why: str = "the loader closed") -> None:
        """End the lane (idempotent): the receiving thread stops, the worker sees the
        connection close. The memory goes now if no array views it, else with the last."""
        with self._lock:
            self._end(why)
        if os.getpid() != self._pid:
            return
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if self._preparer is not None:  # (it never closes the lane)
            self._preparer.join()  # the memory stays mapped while it works in it
        with self._lock:
            self._let_go()

    def _end(self, why: str) -> None:
        """(`_lock` held.) The lane is over: its waiters learn why; the thread stops."""
        if not self.alive:
            return
        self.alive = False
        self.why = why
        self._preparing.notify_all()
        if os.getpid() != self._pid:  # a forked child: the connection is the parent's
            self._sock.close()  # (this process's descriptor only; no thread here)
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread out of its recv
        waiters = list(self._waiters.values())
        if waiters:
            with contextlib.suppress(RuntimeError):  # the event loop is closed
                self._loop.call_soon_threadsafe(_fail, waiters, why)
        log.debug("network lane %s closed: %s", self.id[:4], why)

    def _receive(self) -> None:
        """The thread: each frame into its slot, then its waiter woken."""
        header = memoryview(bytearray(_FRAME.size))
        why = "the worker closed it"
        try:
            while self._recv_exact(header):
                slot, stream, place, size = _FRAME.unpack(header)
                with self._lock:
                    if not self.alive or self._view is None:
                        return
                    if not 0 <= slot < self._slots or not 0 < size <= self._slot_bytes:
                        why = (
                            f"the worker broke the protocol: a frame for slot {slot} of {size} "
                            f"bytes, outside the lane's {self._slots} slots of "
                            f"{self._slot_bytes} bytes"
                        )
                        break
                    if slot in self._held:
                        why = (
                            f"the worker broke the protocol: a frame for slot {slot}, which "
                            "batches this loader delivered still view"
                        )
                        break
                    self._filled.pop(slot, None)
                    if slot >= self._ready:  # a fresh slot: the next ones, ready ahead
                        self._ready = slot + 1  # (this one this thread's copy takes in)
                        self._ready_to = min(self._slots, slot + 1 + PREPARE_AHEAD)
                        self._preparing.notify()
                    start = slot * self._slot_bytes
                    room = self._view[start : start + size]
                try:
                    if not self._recv_exact(room):
                        break
                finally:
                    room.release()
                with self._lock:
                    if not self._mapped_here():  # closed meanwhile
                        return
                    self._filled[slot] = (stream, place, size)
                    waiter = self._waiters.get((slot, stream, place))
                if waiter is not None:
                    self._loop.call_soon_threadsafe(_wake, waiter)
        except OSError as exc:
            why = f"its connection failed: {exc}"
        except RuntimeError:  # the event loop closed under a loader that did not close
            pass
        finally:
            with self._lock:  # the last user of the connection (`_send` needs `alive`)
                self._end(why)
                self._sock.close()

    def _prepare(self) -> None:
        """The second thread: the pages of the slots the worker will write next, taken
        ahead of its frames (it picks the lowest free slot, so slots are first written in
        order), which then land in memory already in. It stops at the lane's end, or at
        the first failure (a kernel before 5.14, no memory): frames take their pages then,
        as they would without it."""
        memory = self._memory  # (mapped until `close`, which waits for this thread)
        if memory is None:
            return
        base = _address(memory)
        while True:
            with self._lock:
                while self.alive and self._ready >= self._ready_to:
                    self._preparing.wait()
                if not self.alive:
                    return
                slot = self._ready
            start = _pages(base + slot * self._slot_bytes)
            end = _page_down(base + (slot + 1) * self._slot_bytes)
            for at in range(start, end, PREPARE_PIECE):
                if self._ended():
                    return
                if _madvise(at, min(PREPARE_PIECE, end - at), _MADV_POPULATE_WRITE) != 0:
                    log.debug("lane pages not prepared: %s", os.strerror(ctypes.get_errno()))
                    return
                time.sleep(PREPARE_PAUSE)
            with self._lock:
                self._ready = max(self._ready, slot + 1)

    def _ended(self) -> bool:
        return not self.alive  # (read anew: another thread ends the lane)

    def _mapped_here(self) -> bool:
        return self._view is not None

    def _recv_exact(self, room: memoryview) -> bool:
        """Fill `room` from the connection; False at its end. In pieces: the kernel holds
        the socket while it copies, and control records wait for it meanwhile."""
        got, size = 0, len(room)
        while got < size:
            n = self._sock.recv_into(room[got:], min(PIECE, size - got), socket.MSG_WAITALL)
            if n == 0:
                return False
            got += n
        return True


def _pages(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _page_down(address: int) -> int:
    return address // mmap.PAGESIZE * mmap.PAGESIZE


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _fail(waiters: list[asyncio.Future[None]], why: str) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(LaneClosedError(why))


async def open_network_lane(
    stub: WorkerStub,
    host: str,
    *,
    slots: int,
    slot_bytes: int,
    most_slot_bytes: int,
    timeout: float = CONNECT_SECONDS,
) -> NetworkLane | None:
    """A network lane of up to `slots` slots of `slot_bytes` (a whole read; the worker
    may give more, up to `most_slot_bytes`: its message size) to the worker behind `stub`
    (reached at `host`), or None where it offers none or its port cannot be reached (a
    firewall: the reads then go as bytes, as they always can)."""
    try:
        offer = await stub.open_lane(
            timeout=timeout, slots=slots, slot_bytes=slot_bytes, network=True
        )
    except grpc.aio.AioRpcError as exc:
        log.debug("no network lane: %s %s", exc.code().name, exc.details())
        return None
    if not 0 < offer.port < 65536 or len(offer.lane) != 16 or offer.slots < 1:
        log.debug("no network lane: the worker's offer is incomplete")
        return None
    if offer.slots > slots or not 0 < offer.slot_bytes <= _pages(most_slot_bytes):
        log.warning(
            "no network lane: the worker offered %d slots of %d bytes, more than the %d of "
            "at most %d bytes this loader holds (its max_message_bytes is below the "
            "worker's?)",
            offer.slots, offer.slot_bytes, slots, most_slot_bytes,
        )  # fmt: skip
        return None
    loop = asyncio.get_running_loop()
    try:
        sock = await loop.run_in_executor(None, _connect_network, host, offer, timeout)
    except (OSError, ValueError) as exc:
        log.info(
            "no network lane to %s port %d (%s): chunks come on the gRPC stream; open the "
            "port, or turn lanes off (--network-lanes off on the worker, network_lane=False "
            "here)",
            host, offer.port, exc,
        )  # fmt: skip
        return None
    try:
        lane = NetworkLane(offer.lane, offer.slots, offer.slot_bytes, sock)
    except (OSError, RuntimeError) as exc:  # no memory for its slots, no thread
        sock.close()
        log.warning("no network lane to %s: %s; chunks come on the gRPC stream", host, exc)
        return None
    except BaseException:
        sock.close()
        raise
    log.debug("network lane %s open: %d slots of %d bytes", offer.lane[:4], offer.slots,
              offer.slot_bytes)  # fmt: skip
    return lane


def _connect_network(host: str, offer: LaneOffer, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, offer.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(offer.lane.encode("ascii") + offer.ticket)
        if sock.recv(1) != b"\1":
            raise ValueError("the worker refused the ticket")
        sock.settimeout(None)  # the receiving thread blocks; control records never do
    except BaseException:
        sock.close()
        raise
    return sock
