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

What a client can hold of the worker's memory. The pages of a lane are charged
to the worker (it writes them), and a client keeps them alive for as long as it
keeps the memfd or a mapping of it, also after the lane ended. So when a lane
ends, the worker hands back the pages of every slot the client said it no longer
views (free slots, and slots of chunks it never received: `MADV_REMOVE`), and
keeps counting what is left against its lane budget (`max_lanes` lanes of their
most bytes, `max_lanes` ended lanes at most) until the client is gone
(`_lanekeep`). A client that hoards ended lanes thus takes lanes from other
clients on its host (they read on the socket), never more memory than the
budget. A client's records of reads it has not ended are bounded too
(`MAX_OPEN_READS`): one that never ends its reads loses its lane.

Network lanes (`Lanes(network=True)`): the same slots and control records for a
client on another host, where the slots are the client's own memory and the
worker fills them over a plain TCP connection beside the gRPC one. Each chunk
goes as a 24-byte frame header (slot, read, the chunk's place in the read, size)
and its message, then the SharedChunk naming it goes on the read's stream. That
skips gRPC's copy of every message on both sides and its framing: the client
receives a chunk with one `recv` into the slot. The connection is not encrypted,
so a worker serving TLS offers none, and a client using TLS asks for none; the
ticket, got over the authenticated OpenLane call, is what admits a connection.
A frame that cannot be sent within the stall timeout (a client that stopped
reading) ends the lane; its reads go on as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hmac
import logging
import mmap
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from shardstream.server._lanekeep import EndedLanes, open_pidfd, peer_pid
from shardstream.server._status import LogLimit

log = logging.getLogger("shardstream.worker")

__all__ = ["Lane", "LaneOffer", "Lanes"]

TICKET_BYTES = 32
TICKET_SECONDS = 30.0  # a ticket not used within this long is dropped
HANDSHAKE_SECONDS = 5.0  # a connection that sends no ticket within this long is closed
DEFAULT_SLOTS = 8  # a lane's slots when the client asks for none in particular
MAX_SLOT_BYTES = 64 << 20  # the most one slot holds, whatever a client asks for
# Connections waiting to show a ticket: past this many, the oldest is closed (a client
# shows its ticket as it connects, so idle connections cannot keep one out).
PENDING_HANDSHAKES = 64
ACCEPT_PAUSE = 0.05  # seconds between accepts while the worker is out of descriptors
RELEASE, END = 1, 2  # control records from the client: (kind, value, count), 3 uint32
_RECORD = struct.Struct("<III")
_ENDED_KEPT = 4096  # ids of reads the client ended, kept so late requests get no slots
# Reads with chunks sent through one lane that the client has not ended (END): a loader
# ends each read as it finishes, so it has a few (its reads in flight); more: it never
# ends them, and its lane is closed rather than its records growing.
MAX_OPEN_READS = 1024
RECLAIM_SECONDS = 1.0  # ended lanes are looked for in /proc at most this often
# A network lane's frame header: slot, read (lane_stream), the chunk's place among the
# read's lane chunks, the message's size; little-endian.
FRAME = struct.Struct("<IIQQ")
PIECE = 256 << 10  # bytes sent at a time (the socket is the kernel's while it copies)
FRAMES_PER_TURN = 4  # frames a lane's sending thread sends before it queues the rest again


@dataclass(frozen=True, slots=True)
class LaneOffer:
    """What `OpenLane` returns: where to connect and the ticket to show."""

    address: str
    ticket: bytes
    lane: str
    slots: int
    slot_bytes: int
    port: int = 0  # a network lane's TCP port (address is then empty)


@dataclass(slots=True)
class _Slot:
    stream: int
    writing: bool
    position: int = -1  # its chunk's place among the read's chunks sent in the lane


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
    _sent: dict[int, int] = field(default_factory=dict)  # per read not ended: chunks sent
    _pending: bytes = b""
    alive: bool = True
    chunks: int = 0  # sent through the lane
    on_close: list[Callable[[Lane], None]] = field(default_factory=list)
    fd: int = -1  # the worker's descriptor of the memfd (-1: none); closed with the lane
    pid: int = 0  # the client's process (SO_PEERCRED; 0: unknown)
    pidfd: int = -1  # a pidfd of it (-1: none), to learn when it is gone
    network: bool = False  # slots in the client's memory, filled over `sock` (TCP)
    sender: Executor | None = None  # a network lane's sending threads
    _writer: socket.socket | None = None  # `sock` duplicated, for the sending thread
    _in_flight: int = 0  # frames queued or being sent
    # A network lane's frames wait here, in order, for the one sending thread that
    # drains them back to back (no trip through the event loop between two frames).
    _frames: deque[_Frame] = field(default_factory=deque)
    _frames_lock: threading.Lock = field(default_factory=threading.Lock)
    _draining: bool = False  # a sending thread drains `_frames` now (or is asked to)
    _broken: bool = False  # a frame failed: none is sent after it
    _last_sent: float = 0.0  # (monotonic) when the sending thread last ended a frame

    def __post_init__(self) -> None:
        self._free = list(range(self.slots - 1, -1, -1))

    async def send(self, stream: int, message: bytes, timeout: float) -> int | None:
        """A network lane's chunk: `message` sent into a free slot of the client's, for
        read `stream`; the slot, to name in the SharedChunk streamed in its place, or None
        (no free slot, too large, or the lane ended: send it as bytes)."""
        if not self.network or len(message) > self.slot_bytes:
            return None
        slot = self.acquire(stream)
        if slot is None:
            return None
        write = functools.partial(send_bytes, message)
        return slot if await self.send_into(slot, stream, len(message), write, timeout) else None

    async def send_into(
        self,
        slot: int,
        stream: int,
        size: int,
        write: Callable[[socket.socket, float], None],
        timeout: float,
    ) -> bool:
        """Send a message of `size` bytes into `slot` (acquired for read `stream`) of a
        network lane's client, `write` sending it (in a sending thread, on a blocking
        socket with `timeout` per piece), and mark the slot written: whether it was sent.
        A frame that is not sent within `timeout` (the client does not read) ends the
        lane, as does one `write` fails (raised here). Cancelled, the frame is still sent
        whole (the connection stays in step) and the slot freed."""
        header = FRAME.pack(slot, stream, self._sent.get(stream, 0), size)
        task = asyncio.ensure_future(self._send_frame(header, write, timeout))
        try:
            sent = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda _: self.written(slot, sent=False))
            raise
        except BaseException:
            self.written(slot, sent=False)
            raise
        self.written(slot, sent=sent)
        return sent

    async def _send_frame(
        self, header: bytes, write: Callable[[socket.socket, float], None], timeout: float
    ) -> bool:
        """Send one frame whole, in the lane's sending thread (the event loop goes on
        meanwhile), after the frames queued before it; False (and the lane ended) where
        it could not be sent within `timeout` of its turn (the frame before it sent, or
        it queued, whichever is later: waiting for a thread counts)."""
        if not self.alive or self.sender is None:
            return False
        loop = asyncio.get_running_loop()
        if self._writer is None:  # the same connection, blocking with a timeout
            self._writer = self.sock.dup()
        done: asyncio.Future[BaseException | None] = loop.create_future()
        frame = _Frame(header, write, timeout, time.monotonic(), loop, done)
        self._in_flight += 1
        try:
            with self._frames_lock:
                self._frames.append(frame)
                start, self._draining = not self._draining, True
            if start:
                self._start_drain(self._writer)
            error = await done  # (settled by the thread that took the frame, or here)
        finally:
            self._in_flight -= 1
            self._close_writer()
        if error is None:
            return self.alive
        if isinstance(error, _Unsent):
            return False
        if isinstance(error, TimeoutError):
            self.close(f"a chunk was not taken within {timeout:g}s")
            return False
        if isinstance(error, OSError):
            self.close(f"its connection failed: {error}")
            return False
        self.close(f"a chunk could not be sent whole: {error}")  # a frame cut short
        raise error

    def _start_drain(self, writer: socket.socket) -> None:
        """(`_draining` just set.) Have a sending thread drain the frames. Where none can
        be had (the lanes shutting down, no thread left) the lane ends: a job the
        executor queued before failing to start a thread must find it ended, so that it
        never sends beside another. The frames still queued are not sent; one that such
        a job took already is its to send and settle (its writer stays open till then)."""
        assert self.sender is not None
        try:
            self.sender.submit(self._drain, writer)
        except RuntimeError as exc:
            self.close(f"no sending thread: {exc}")
            self._fail_queued()

    def _drain(self, writer: socket.socket) -> None:
        """(A sending thread.) Send the queued frames, one after another, until none is
        left; each one's outcome goes to its waiting task. After a frame that failed
        (the connection is out of step, or gone) no other is sent. After a few frames
        the thread is handed back and the rest queued again, after other lanes' work."""
        sent = 0
        try:
            while True:
                with self._frames_lock:
                    if not self._frames:
                        self._draining = False
                        return
                    if sent == FRAMES_PER_TURN:
                        break
                    frame = self._frames.popleft()
                error: BaseException | None = None
                if self._broken or not self.alive:
                    error = _Unsent()
                else:
                    try:
                        turn = max(frame.queued, self._last_sent)
                        _frame(writer, frame.header, frame.write, turn + frame.timeout)
                    except BaseException as exc:
                        self._broken = True
                        error = exc
                    self._last_sent = time.monotonic()
                    sent += 1
                with contextlib.suppress(RuntimeError):  # the event loop closed
                    frame.loop.call_soon_threadsafe(_settle, frame.done, error)
                del frame, error
        except BaseException:
            self._broken = True
            self._fail_queued()
            raise
        try:  # more than a turn's frames: the rest after what else waits for a thread
            assert self.sender is not None
            self.sender.submit(self._drain, writer)
        except RuntimeError:  # shutting down: what is left is not sent
            self._broken = True
            self._fail_queued()

    def _fail_queued(self) -> None:
        """(Any thread, the lane broken or ended.) The queued frames' tasks learn they
        were not sent; a next frame starts a thread again (and is refused)."""
        with self._frames_lock:
            frames = list(self._frames)
            self._frames.clear()
            self._draining = False
        for frame in frames:
            with contextlib.suppress(RuntimeError):
                frame.loop.call_soon_threadsafe(_settle, frame.done, _Unsent())

    def _close_writer(self) -> None:
        """Close the sending thread's socket once the lane ended and no frame is sent."""
        if not self.alive and self._writer is not None and self._in_flight == 0:
            self._writer.close()
            self._writer = None

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
            return
        held.position = self._sent.get(held.stream, 0)
        self._sent[held.stream] = held.position + 1
        self.chunks += 1
        if len(self._sent) > MAX_OPEN_READS:
            log.warning(
                "%s lane %s: its client has ended none of %d reads (no END records): "
                "closing the lane; its reads go on over the socket",
                _kind(self),
                tag(self.id),
                len(self._sent),
            )
            self.close(f"more than {MAX_OPEN_READS} reads not ended")

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
            sent = self._sent.pop(value, 0)
            if count > sent:
                return f"it received {count} chunks of read {value}, {sent} were sent"
            if count < sent:  # sent, never received: the client never sees them
                for index, held in list(self._held.items()):
                    if held.stream == value and not held.writing and held.position >= count:
                        self._free_slot(index)
        else:
            return f"unknown record kind {kind}"
        return None

    def _free_slot(self, index: int) -> None:
        del self._held[index]
        self._free.append(index)

    def close(self, why: str) -> None:
        """End the lane (idempotent); reads on it go on as bytes. The pages of the slots
        the client does not hold are handed back now; the rest goes when the last view of
        it does (the client's, or a chunk being written). `on_close` callbacks may take
        over `fd` and `pidfd` (set them to -1); otherwise they are closed here."""
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        if self.network:  # a sending thread's frame ends now (its writer closes after)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self._close_writer()
        self.sock.close()
        self._hand_back([i for i in range(self.slots) if i not in self._held])
        self._held.clear()
        self._sent.clear()
        for callback in self.on_close:
            callback(self)
        self.close_fds()
        log.info("%s lane %s closed: %s", _kind(self), tag(self.id), why)

    def close_fds(self) -> None:
        for name in ("fd", "pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def _hand_back(self, indices: list[int]) -> None:
        """Free the pages of these slots (the memory reads as zeros afterwards): slots no
        view of the client's holds, whoever else keeps the memfd."""
        memory = self.view.obj
        if not isinstance(memory, mmap.mmap):
            return
        for index in indices:
            with contextlib.suppress(OSError, ValueError):  # not a shared file mapping
                memory.madvise(mmap.MADV_REMOVE, index * self.slot_bytes, self.slot_bytes)


class Lanes:
    """The worker's lanes: the Unix socket clients reach them by, tickets, open lanes.

    `offer()` (from OpenLane) makes a ticket; a thread accepts connections and hands
    each one that shows a valid ticket its lane's memory; the lane then lives on the
    event loop (`get`)."""

    def __init__(
        self,
        *,
        slots: int,
        slot_bytes: int,
        max_lanes: int,
        network: bool = False,
        host: str = "",
        port: int = 0,
        stall: float = 30.0,
    ) -> None:
        """At most `max_lanes` lanes of at most `slots` slots, and `slots` x `slot_bytes`
        bytes, each; a slot holds at least `slot_bytes` (a whole message). `network`:
        network lanes, listening on TCP `host`:`port` (0: a free port)."""
        self.network = network
        self._host, self._port = host, port
        self.stall = stall  # seconds a network lane's frame may take to be sent
        # network lanes send in these threads (the GIL is let go while the kernel copies)
        # (one frame at a time per lane, so no lane's frame ever waits for another's)
        self._sender = ThreadPoolExecutor(max_lanes, "shardstream-lane-send") if network else None
        self.port = 0  # a network lane's listening port, once started
        self._slots = slots
        self._slot_bytes = _pages(slot_bytes)
        self._budget = slots * self._slot_bytes  # the most bytes of one lane
        self._max = max_lanes
        self._total = max_lanes * self._budget  # the most bytes of all lanes, ended ones too
        self._ended = EndedLanes()  # ended lanes whose clients may still hold their memory
        self.opened = 0  # lanes opened, all told
        self._chunks_of_closed = 0  # chunks sent through lanes now closed
        self._counting = threading.Lock()  # a closed lane's chunks move to the sum in one go
        self._next_reclaim = 0.0
        self._lock = threading.Lock()
        self._wake: tuple[socket.socket, socket.socket] | None = None  # wakes `_accept`
        # Anyone on the host can connect to the socket: a flood of refusals costs a few lines
        self._refusals = LogLimit(log)
        # lane id -> (ticket, deadline, slots, slot bytes)
        self._tickets: dict[str, tuple[bytes, float, int, int]] = {}
        self._lanes: dict[str, Lane] = {}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.address = ""

    def start(self) -> None:
        """Listen on a fresh abstract Unix socket (OSError where there is none: not
        Linux), or for network lanes on the TCP port (OSError where it is taken)."""
        self._loop = asyncio.get_running_loop()
        if self.network:
            host = self._host.strip("[]") or "0.0.0.0"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            name = ""
        else:
            name = f"shardstream-lane-{os.getpid()}-{secrets.token_hex(8)}"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.network:  # a fixed port is bound again at once by a restarted worker
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, self._port))
                self.port = listener.getsockname()[1]
            else:
                listener.bind("\0" + name)
            listener.listen(socket.SOMAXCONN)
        except BaseException:
            listener.close()
            raise
        self._listener, self.address = listener, name
        self._wake = socket.socketpair()
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
            self._drop(old_id)
        with self._lock:
            room = self._room(slots * size, now)
        if not room and now >= self._next_reclaim:  # ended lanes may have been let go of
            self._next_reclaim = now + RECLAIM_SECONDS
            self._ended.reclaim()
        with self._lock:
            if self._listener is None or not self._room(slots * size, now):
                return None
            lane_id, ticket = secrets.token_hex(8), secrets.token_bytes(TICKET_BYTES)
            self._tickets[lane_id] = (ticket, now + TICKET_SECONDS, slots, size)
        return LaneOffer(self.address, ticket, lane_id, slots, size, self.port)

    def _room(self, nbytes: int, now: float) -> bool:
        """Whether a lane of `nbytes` fits (`_lock` held): fewer than `max_lanes` lanes
        (open or offered) and ended lanes kept, and all their bytes within the budget."""
        for lane_id, (_, deadline, _, _) in list(self._tickets.items()):
            if deadline < now:
                del self._tickets[lane_id]
        offered = sum(slots * size for _, _, slots, size in self._tickets.values())
        count = len(self._lanes) + len(self._tickets)
        taken = offered + sum(lane.slots * lane.slot_bytes for lane in self._lanes.values())
        taken += self._ended.nbytes()
        ended = len(self._ended)
        return count < self._max and ended < self._max and taken + nbytes <= self._total

    @property
    def kind(self) -> str:
        return "network" if self.network else "same-host"

    def kept_bytes(self) -> int:
        """Bytes of ended lanes that their clients may still hold (counted in the budget)."""
        return self._ended.nbytes()

    def get(self, lane_id: str) -> Lane | None:
        lane = self._lanes.get(lane_id)
        return lane if lane is not None and lane.alive else None

    def count(self) -> int:
        return sum(1 for lane in self._lanes.values() if lane.alive)

    def close(self) -> None:
        """Stop taking lanes and end every open one (on the event loop)."""
        listener, self._listener = self._listener, None
        wake, self._wake = self._wake, None
        if wake is not None:
            with contextlib.suppress(OSError):
                wake[1].send(b"\0")
        if self._thread is not None:
            self._thread.join(5)
        if listener is not None:
            listener.close()
        for end in wake or ():
            end.close()
        for lane in list(self._lanes.values()):
            lane.close("the worker is stopping")
        self._lanes.clear()
        self._ended.close()
        if self._sender is not None:
            self._sender.shutdown(wait=True)  # their frames end: the lanes were shut down

    # -- the accepting thread ------------------------------------------------------------

    def _accept(self) -> None:
        """Accept connections and read their tickets, all in this thread without waiting
        on any one: a connection has HANDSHAKE_SECONDS to show its ticket, and the oldest
        is closed to make room past PENDING_HANDSHAKES (idle ones keep no lane out)."""
        listener, wake = self._listener, self._wake
        assert listener is not None and wake is not None
        listener.setblocking(False)
        pending: OrderedDict[socket.socket, tuple[bytearray, float]] = OrderedDict()
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ, None)
            sel.register(wake[0], selectors.EVENT_READ, None)
            try:
                while self._listener is not None:
                    now = time.monotonic()
                    while pending and next(iter(pending.values()))[1] <= now:
                        self._refuse(sel, pending, next(iter(pending)), "it sent no ticket")
                    wait = next(iter(pending.values()))[1] - now if pending else None
                    for key, _ in sel.select(wait):
                        if key.fileobj is listener:
                            self._take(sel, pending, listener)
                        elif key.fileobj in pending:  # (not one crowded out meanwhile)
                            self._hear(sel, pending, key.fileobj)  # type: ignore[arg-type]
            finally:
                for conn in pending:
                    conn.close()

    def _take(
        self,
        sel: selectors.BaseSelector,
        pending: OrderedDict[socket.socket, tuple[bytearray, float]],
        listener: socket.socket,
    ) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of descriptors: the next one may be taken, later
            self._refusals.log(logging.WARNING, "lane", "%s lane refused: %s", self.kind, exc)
            time.sleep(ACCEPT_PAUSE)  # the listener stays readable: no spinning on it
            return
        if len(pending) >= PENDING_HANDSHAKES:
            self._refuse(sel, pending, next(iter(pending)), "it sent no ticket (crowded out)")
        conn.setblocking(False)
        pending[conn] = (bytearray(), time.monotonic() + HANDSHAKE_SECONDS)
        sel.register(conn, selectors.EVENT_READ, None)

    def _hear(
        self,
        sel: selectors.BaseSelector,
        pending: OrderedDict[socket.socket, tuple[bytearray, float]],
        conn: socket.socket,
    ) -> None:
        hello = pending[conn][0]
        try:
            part = conn.recv(16 + TICKET_BYTES - len(hello))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._refuse(sel, pending, conn, str(exc))
            return
        if not part:
            self._refuse(sel, pending, conn, "the client sent no ticket")
            return
        hello += part
        if len(hello) < 16 + TICKET_BYTES:
            return
        sel.unregister(conn)
        del pending[conn]
        try:
            self._handshake(conn, bytes(hello))
        except Exception as exc:  # one client's trouble never stops the others
            self._refusals.log(logging.WARNING, "lane", "%s lane refused: %s", self.kind, exc)
            conn.close()

    def _refuse(
        self,
        sel: selectors.BaseSelector,
        pending: OrderedDict[socket.socket, tuple[bytearray, float]],
        conn: socket.socket,
        why: str,
    ) -> None:
        sel.unregister(conn)
        del pending[conn]
        conn.close()
        self._refusals.log(logging.WARNING, "lane", "%s lane refused: %s", self.kind, why)

    def _handshake(self, conn: socket.socket, hello: bytes) -> None:
        lane_id, ticket = hello[:16].decode("ascii", "replace"), hello[16:]
        with self._lock:  # a ticket is used up by the connection that shows it
            expected = self._tickets.get(lane_id)
            if expected is None or not hmac.compare_digest(expected[0], ticket):
                raise PermissionError("an unknown, used or wrong ticket")
            del self._tickets[lane_id]
        if expected[1] < time.monotonic():
            raise PermissionError("an expired ticket")
        slots, slot_bytes = expected[2], expected[3]
        if self.network:  # the byte that tells the client is sent once it is attached
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lane = Lane(lane_id, slots, slot_bytes, memoryview(b""), conn, network=True,
                        sender=self._sender)  # fmt: skip
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._attach, lane)
            return
        pid = peer_pid(conn)
        pidfd = open_pidfd(pid)  # opened now: it names this very process, whatever pids do
        # named by its id: how `_lanekeep` finds it among a client's mappings (/proc, which
        # only the client's own user and root can read)
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
            socket.send_fds(conn, [b"\1"], [fd])  # one byte into an empty socket buffer
        except BaseException:
            os.close(fd)
            if pidfd >= 0:
                os.close(pidfd)
            raise
        # The worker keeps its descriptor: to see and free what is left once the lane ends.
        lane = Lane(lane_id, slots, slot_bytes, memoryview(memory), conn, fd=fd, pid=pid,
                    pidfd=pidfd)  # fmt: skip
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._attach, lane)

    def open_lanes(self) -> int:
        """Lanes open now (read from any thread)."""
        return sum(1 for lane in list(self._lanes.values()) if lane.alive)

    def chunks_sent(self) -> int:
        """Chunks sent through lanes, all told (read from any thread: never a lane's
        twice, nor none of them, as it closes)."""
        with self._counting:
            lanes = list(self._lanes.values())
            return self._chunks_of_closed + sum(lane.chunks for lane in lanes)

    def _drop(self, lane_id: str) -> None:
        with self._counting:
            lane = self._lanes.pop(lane_id, None)
            if lane is not None:
                self._chunks_of_closed += lane.chunks

    def _forget(self, lane: Lane) -> None:
        """A closed lane: nothing here keeps it, so its memory goes with its last view; what
        its client may still hold of it stays counted (`EndedLanes`) until it is gone."""
        self._drop(lane.id)
        loop = self._loop
        if loop is None or self._listener is None or lane.fd < 0:  # stopping: it all goes
            return
        if self._ended.keep(lane.id, lane.fd, lane.pid, lane.pidfd, loop):
            lane.fd = lane.pidfd = -1  # theirs now

    def _attach(self, lane: Lane) -> None:
        if self._listener is None:  # stopping
            lane.close("the worker is stopping")
            return
        for old_id in [k for k, v in self._lanes.items() if not v.alive]:
            self._drop(old_id)
        self._lanes[lane.id] = lane
        lane.on_close.append(self._forget)
        asyncio.get_running_loop().add_reader(lane.sock.fileno(), lane.on_readable)
        if lane.network:  # its reads find it from now on: the client may name it
            try:
                lane.sock.send(b"\1")  # into an empty socket buffer
            except OSError as exc:
                lane.close(f"its connection failed: {exc}")
                return
        self.opened += 1
        log.info("%s lane %s open: %d slots of %d bytes", _kind(lane), tag(lane.id),
                 lane.slots, lane.slot_bytes)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Frame:
    """A network lane's frame waiting for its sending thread."""

    header: bytes
    write: Callable[[socket.socket, float], None]
    timeout: float
    queued: float  # (monotonic)
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[BaseException | None]  # its outcome: None, or why it failed


class _Unsent(Exception):
    """A frame not sent: an earlier one failed, or the lane ended."""


def _settle(done: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not done.done():
        done.set_result(error)


def _frame(
    sock: socket.socket,
    header: bytes,
    write: Callable[[socket.socket, float], None],
    deadline: float,
) -> None:
    """(A sending thread.) One frame: its header, then its message, all of it by
    `deadline` (monotonic; TimeoutError past it)."""
    send_by(sock, header, deadline)
    write(sock, deadline)


def send_by(sock: socket.socket, data: bytes | bytearray | memoryview, deadline: float) -> None:
    """`sendall` on a socket with a timeout, all of it by `deadline` (monotonic), in
    pieces: the kernel holds the socket while it copies, and the event loop's reads of
    control records wait for it meanwhile."""
    with memoryview(data) as view:
        for at in range(0, len(view), PIECE):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame was not taken in time")
            sock.settimeout(left)
            sock.sendall(view[at : at + PIECE])


def send_bytes(message: bytes, sock: socket.socket, deadline: float) -> None:
    """(A sending thread.) A message that is bytes, by `deadline`."""
    send_by(sock, message, deadline)


def _kind(lane: Lane) -> str:
    return "network" if lane.network else "same-host"


def tag(lane_id: str) -> str:
    """A lane's name in logs: the start of its id. The whole id lets a token holder's
    reads take the lane's slots, so it is told only to the client that opened the lane."""
    return lane_id[:4]


def _pages(n: int) -> int:
    """`n` rounded up to whole pages."""
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
