"""Same-host lanes: chunks through shared memory to clients on the worker's own host.

A worker that runs beside its trainer (a sidecar, spare cores of a GPU node) need
not push tensor bytes through a socket. A client asks for a lane (`OpenLane`,
an authenticated call like any other: token and mTLS apply), connects to the
worker's Unix socket in the Linux abstract namespace (reachable only from the
same host and network namespace: that is the proof), presents the single-use
ticket it got, and receives the lane's memory, a memfd of `slots` slots, by
SCM_RIGHTS. A slot holds the client's largest chunk, a whole read: on a lane a
chunk is not bounded by the gRPC message size, so a read of direct chunks
(`_direct`) is one chunk, and what each chunk costs both sides is paid once a
read (`_streaming`). Its reads then name the lane, and the worker puts each chunk's
message into a free slot and streams a small `SharedChunk` (start, count,
shard, slot, size) in its place: gRPC still carries every chunk's header, the
order and the End, so exactly once, resuming and every check stay as they are.

The socket stays open as the lane's control channel. The client writes 12-byte
records to it: (1, slot, 0) when nothing of its views a slot any more (its arrays
are views of the slot until then), (2, stream, n) when it is done with a read
(`ReadRequest.lane_stream`) of which n shared chunks arrived: the slots of the
later ones (sent, never received: the read was cancelled or cut) are free. A
slot is free, or held by one read (being written, sent, or in the client's
use). A chunk that finds no free slot, or a lane that is gone, travels as bytes
on the stream: the lane only ever saves copies. Either side closing the socket (a SIGKILL too) ends
the lane; the memory is anonymous and goes with the last mapping: nothing is
left behind, in /dev/shm or anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("shardstream.worker")

__all__ = ["Lane", "LaneOffer", "Lanes"]

TICKET_BYTES = 32
TICKET_SECONDS = 30.0  # a ticket not used within this long is dropped
HANDSHAKE_SECONDS = 5.0  # a connection that sends no ticket within this long is closed
DEFAULT_SLOTS = 8  # a lane's slots when the client asks for none in particular
MAX_SLOT_BYTES = 64 << 20  # the most one slot holds, whatever a client asks for
HANDSHAKES = 8  # connections presenting a ticket at once
RELEASE, END = 1, 2  # control records from the client: (kind, value, count), 3 uint32
_RECORD = struct.Struct("<III")
_ENDED_KEPT = 4096  # ids of reads the client ended, kept so late requests get no slots


@dataclass(frozen=True, slots=True)
class LaneOffer:
    """What `OpenLane` returns: where to connect and the ticket to show."""

    address: str
    ticket: bytes
    lane: str
    slots: int
    slot_bytes: int


@dataclass(slots=True)
class _Slot:
    stream: int
    writing: bool


@dataclass(eq=False)
class Lane:
    """One client's lane: its memory, its slots and its control socket."""

    id: str
    slots: int
    slot_bytes: int
    view: memoryview
    sock: socket.socket
    _held: dict[int, _Slot] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)
    _ended: OrderedDict[int, None] = field(default_factory=OrderedDict)
    _sent: dict[int, list[int]] = field(default_factory=dict)  # per read: slots, in order
    _pending: bytes = b""
    alive: bool = True
    chunks: int = 0  # sent through the lane
    on_close: list[Callable[[Lane], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(range(self.slots - 1, -1, -1))

    def slot(self, index: int) -> memoryview:
        start = index * self.slot_bytes
        return self.view[start : start + self.slot_bytes]

    def acquire(self, stream: int) -> int | None:
        """A free slot for a chunk of read `stream`, to write into; None if there is
        none (the chunk goes as bytes) or the client already ended that read."""
        if not self.alive or not self._free or stream in self._ended:
            return None
        index = self._free.pop()
        self._held[index] = _Slot(stream, writing=True)
        return index

    def written(self, index: int, *, sent: bool) -> None:
        """The worker is done writing `index`: sent to the client (now the client's to
        release), or not (free again)."""
        held = self._held.get(index)
        if held is None:
            return
        held.writing = False
        if not sent or held.stream in self._ended:
            self._free_slot(index)
        else:
            self._sent.setdefault(held.stream, []).append(index)
            self.chunks += 1

    def on_readable(self) -> None:
        """Control records from the client (the event loop calls this when readable)."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"its socket failed: {exc}")
            return
        if not data:
            self.close("the client closed it")
            return
        data = self._pending + data
        whole = len(data) - len(data) % _RECORD.size
        self._pending = data[whole:]
        for kind, value, count in _RECORD.iter_unpack(data[:whole]):
            problem = self._apply(kind, value, count)
            if problem is not None:
                self.close(f"the client broke the protocol: {problem}")
                return

    def _apply(self, kind: int, value: int, count: int) -> str | None:
        if kind == RELEASE:
            held = self._held.get(value)
            if held is None or held.writing:
                return f"it released slot {value}, which it does not hold"
            self._free_slot(value)
        elif kind == END:
            self._ended[value] = None
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
            sent = self._sent.pop(value, [])
            if count > len(sent):
                return f"it received {count} chunks of read {value}, {len(sent)} were sent"
            for index in sent[count:]:  # sent, never received: the client never sees them
                held = self._held.get(index)
                if held is not None and held.stream == value and not held.writing:
                    self._free_slot(index)
        else:
            return f"unknown record kind {kind}"
        return None

    def _free_slot(self, index: int) -> None:
        del self._held[index]
        self._free.append(index)

    def close(self, why: str) -> None:
        """End the lane (idempotent); reads on it go on as bytes. The memory goes when the
        last view of it does (a chunk being written keeps it)."""
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self._held.clear()
        self._sent.clear()
        for callback in self.on_close:
            callback(self)
        log.info("same-host lane %s closed: %s", self.id, why)


class Lanes:
    """The worker's lanes: the Unix socket clients reach them by, tickets, open lanes.

    `offer()` (from OpenLane) makes a ticket; a thread accepts connections and hands
    each one that shows a valid ticket its lane's memory; the lane then lives on the
    event loop (`get`)."""

    def __init__(self, *, slots: int, slot_bytes: int, max_lanes: int) -> None:
        """At most `max_lanes` lanes of at most `slots` slots, and `slots` x `slot_bytes`
        bytes, each; a slot holds at least `slot_bytes` (a whole message)."""
        self._slots = slots
        self._slot_bytes = _pages(slot_bytes)
        self._budget = slots * self._slot_bytes  # the most bytes of one lane
        self._max = max_lanes
        self._lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(HANDSHAKES)
        # lane id -> (ticket, deadline, slots, slot bytes)
        self._tickets: dict[str, tuple[bytes, float, int, int]] = {}
        self._lanes: dict[str, Lane] = {}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.address = ""

    def start(self) -> None:
        """Listen on a fresh abstract Unix socket; OSError where there is none (not Linux)."""
        self._loop = asyncio.get_running_loop()
        name = f"shardstream-lane-{os.getpid()}-{secrets.token_hex(8)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + name)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        self._listener, self.address = listener, name
        self._thread = threading.Thread(target=self._accept, name="shardstream-lanes", daemon=True)
        self._thread.start()

    def offer(self, slots: int = 0, slot_bytes: int = 0) -> LaneOffer | None:
        """A ticket for a new lane of `slots` slots (0: 8) of `slot_bytes` each (0: the
        worker's own), within the worker's bounds, or None when it holds its most lanes."""
        size = min(max(slot_bytes, self._slot_bytes), max(MAX_SLOT_BYTES, self._slot_bytes))
        size = _pages(min(size, self._budget))
        slots = max(1, min(slots or DEFAULT_SLOTS, self._slots, self._budget // size))
        now = time.monotonic()
        for old_id in [k for k, v in self._lanes.items() if not v.alive]:
            del self._lanes[old_id]
        with self._lock:
            for lane_id, (_, deadline, _, _) in list(self._tickets.items()):
                if deadline < now:
                    del self._tickets[lane_id]
            if self._listener is None or len(self._lanes) + len(self._tickets) >= self._max:
                return None
            lane_id, ticket = secrets.token_hex(8), secrets.token_bytes(TICKET_BYTES)
            self._tickets[lane_id] = (ticket, now + TICKET_SECONDS, slots, size)
        return LaneOffer(self.address, ticket, lane_id, slots, size)

    def get(self, lane_id: str) -> Lane | None:
        lane = self._lanes.get(lane_id)
        return lane if lane is not None and lane.alive else None

    def count(self) -> int:
        return sum(1 for lane in self._lanes.values() if lane.alive)

    def close(self) -> None:
        """Stop taking lanes and end every open one (on the event loop)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
        for lane in list(self._lanes.values()):
            lane.close("the worker is stopping")
        self._lanes.clear()

    # -- the accepting thread ------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            # Handshakes run side by side, so a connection that sends nothing holds up
            # no other; at most HANDSHAKES at once (more are closed: they fall back).
            if not self._handshakes.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(
                target=self._handshake_once, args=(conn,), name="shardstream-lane", daemon=True
            ).start()

    def _handshake_once(self, conn: socket.socket) -> None:
        try:
            self._handshake(conn)
        except Exception as exc:  # one client's trouble never stops the others
            log.warning("same-host lane refused: %s", exc)
            conn.close()
        finally:
            self._handshakes.release()

    def _handshake(self, conn: socket.socket) -> None:
        conn.settimeout(HANDSHAKE_SECONDS)
        hello = b""
        while len(hello) < 16 + TICKET_BYTES:
            part = conn.recv(16 + TICKET_BYTES - len(hello))
            if not part:
                raise ConnectionError("the client sent no ticket")
            hello += part
        lane_id, ticket = hello[:16].decode("ascii", "replace"), hello[16:]
        with self._lock:  # a ticket is used up by the connection that shows it
            expected = self._tickets.get(lane_id)
            if expected is None or not hmac.compare_digest(expected[0], ticket):
                raise PermissionError("an unknown, used or wrong ticket")
            del self._tickets[lane_id]
        if expected[1] < time.monotonic():
            raise PermissionError("an expired ticket")
        slots, slot_bytes = expected[2], expected[3]
        fd = os.memfd_create(f"shardstream-lane-{lane_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            size = slots * slot_bytes
            os.ftruncate(fd, size)  # sparse: pages are allocated when first written
            # Sealed at that size: the client can check that it can never shrink under
            # its mapping (which would be SIGBUS there).
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            memory = mmap.mmap(fd, size)
            socket.send_fds(conn, [b"\1"], [fd])
        finally:
            os.close(fd)  # the mapping and the client's copy of the descriptor keep it
        conn.setblocking(False)
        lane = Lane(lane_id, slots, slot_bytes, memoryview(memory), conn)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._attach, lane)

    def _forget(self, lane: Lane) -> None:
        """A closed lane: nothing here keeps it, so its memory goes with its last view."""
        self._lanes.pop(lane.id, None)

    def _attach(self, lane: Lane) -> None:
        if self._listener is None:  # stopping
            lane.close("the worker is stopping")
            return
        for old_id in [k for k, v in self._lanes.items() if not v.alive]:
            del self._lanes[old_id]
        self._lanes[lane.id] = lane
        lane.on_close.append(self._forget)
        asyncio.get_running_loop().add_reader(lane.sock.fileno(), lane.on_readable)
        log.info("same-host lane %s open: %d slots of %d bytes", lane.id, lane.slots,
                 lane.slot_bytes)  # fmt: skip


def _pages(n: int) -> int:
    """`n` rounded up to whole pages."""
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
