"""Same-host lanes: chunks through shared memory between a worker and a client on one
host, with every guarantee of the socket path, and the socket whenever a lane cannot be.

Workers here run as real processes (`shardstream-worker`) except where a test looks at a
worker's lanes from inside; the client is the loader a user runs, or a real process for
the SIGKILL tests."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lane_helpers import OPTIONS, assert_same, epoch_batches, killable_client, lane_bytes

from shardstream.client import Loader, SyncLoader
from shardstream.client._wire import LaneOffer, WorkerStub
from shardstream.server._lanes import END, RELEASE, Lane

from conftest import RECORDS, running_workers, worker_processes


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound and closed here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digest(batch: dict[str, np.ndarray]) -> list[bytes]:
    return [k.encode() + str(v.dtype).encode() + v.tobytes() for k, v in sorted(batch.items())]


@pytest.mark.parametrize("processes", ["0", "1"])
async def test_a_local_worker_hands_chunks_over_in_shared_memory(
    npz_root: Path, processes: str
) -> None:
    """By default a loader on the worker's host gets its chunks through its lane (decoded
    in threads, or read directly from stored npz by the server process), byte-identical
    to the same epochs over the socket. A consumer that lets each batch go gets every
    chunk through the lane; one that keeps every batch keeps their slots, and the chunks
    that find none come on the socket, the same bytes. A SyncLoader likewise."""
    with worker_processes(npz_root, 1, "--processes", processes) as (w,):
        async with Loader(
            [w.address], **OPTIONS, same_host_lane=False, network_lane=False
        ) as loader:
            socket_epochs = [await epoch_batches(loader, e) for e in (0, 1)]
            assert lane_bytes(loader) == 0
        async with Loader([w.address], **OPTIONS) as loader:
            streamed, sent = [], 0
            async for batch in loader.epoch(0):  # each batch let go before the next
                streamed.append(digest(batch))
                sent += sum(v.nbytes for v in batch.values())
            assert lane_bytes(loader) >= sent  # every chunk (its message, headers too)
            kept = await epoch_batches(loader, 1)
            assert lane_bytes(loader) > sent
        assert streamed == [digest(b) for b in socket_epochs[0]]
        assert_same(kept, socket_epochs[1])
        with SyncLoader([w.address], **OPTIONS) as sync:
            assert [digest(b) for b in sync.epoch(1)] == [digest(b) for b in kept]
            assert sum(sync.statistics().lane_bytes_by_worker.values()) > 0


async def test_decoding_processes_fill_the_lane_too(tmp_path: Path) -> None:
    """Deflated shards are decoded in a decoding process; its chunks go into the lane."""
    from shardstream.server import make_dataset

    for path in make_dataset(tmp_path, shards=4, records=800, shape=(8, 8, 3)):
        with np.load(path) as npz:
            arrays = dict(npz)
        np.savez_compressed(path, **arrays)
    with worker_processes(tmp_path, 1, "--processes", "1") as (w,):
        async with Loader([w.address], **OPTIONS) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert lane_bytes(loader) > 0
    assert sorted(ids.tolist()) == list(range(800))


async def test_a_worker_with_lanes_off_serves_on_the_socket(npz_root: Path) -> None:
    with worker_processes(npz_root, 1, "--lanes", "off", "--network-lanes", "off") as (w,):
        async with Loader([w.address], **OPTIONS) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert loader.statistics().lane_bytes_by_worker == {}
    assert sorted(ids.tolist()) == list(range(RECORDS))


async def test_a_lane_that_cannot_be_reached_leaves_the_socket(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on another host (or network namespace) offers a lane whose socket is not
    there: the loader reads on the socket, exactly once."""
    real = WorkerStub.open_lane

    async def elsewhere(
        self: WorkerStub,
        *,
        timeout: float,
        slots: int = 0,
        slot_bytes: int = 0,
        network: bool = False,
    ) -> LaneOffer:
        offer = await real(self, timeout=timeout, slots=slots, slot_bytes=slot_bytes,
                           network=network)  # fmt: skip
        if network:  # a network lane's port that nothing listens on
            return LaneOffer("", offer.ticket, offer.lane, offer.slots, offer.slot_bytes,
                             closed_port())  # fmt: skip
        return LaneOffer("shardstream-lane-on-another-host", offer.ticket, offer.lane,
                         offer.slots, offer.slot_bytes)  # fmt: skip

    monkeypatch.setattr(WorkerStub, "open_lane", elsewhere)
    with worker_processes(npz_root, 1) as (w,):
        async with Loader([w.address], **OPTIONS) as loader:
            assert [c.lane for c in loader._pool.conns] == [None]
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
    assert sorted(ids.tolist()) == list(range(RECORDS))


async def test_tickets_are_single_use_and_checked(npz_root: Path) -> None:
    """The lane's memory goes only to a connection showing the ticket OpenLane gave: a
    wrong ticket, or the right one a second time, gets the connection closed."""
    import grpc

    async with running_workers(npz_root, 1, processes=1) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            offer = await WorkerStub(channel).open_lane(timeout=5)

            def attempt(ticket: bytes) -> tuple[bytes, list[int]]:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect("\0" + offer.address)
                    s.sendall(offer.lane.encode() + ticket)
                    message, fds, _, _ = socket.recv_fds(s, 1, 1)
                    for fd in fds:
                        os.close(fd)
                    return message, fds

            wrong = bytes(b ^ 1 for b in offer.ticket)
            assert await asyncio.to_thread(attempt, wrong) == (b"", [])
            assert len((await asyncio.to_thread(attempt, offer.ticket))[1]) == 1
            assert await asyncio.to_thread(attempt, offer.ticket) == (b"", [])


async def test_a_flood_of_wrong_tickets_costs_the_log_a_few_lines(
    npz_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone on the host can reach the lane's socket (an abstract name, listed in
    /proc/net/unix): each wrong ticket used to log a warning, 7,029 lines in 2 s."""
    import grpc

    async with running_workers(npz_root, 1) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            offer = await WorkerStub(channel).open_lane(timeout=5)

        def flood() -> None:
            for _ in range(300):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect("\0" + offer.address)
                    s.sendall(offer.lane.encode() + bytes(len(offer.ticket)))
                    assert s.recv(1) == b""  # refused: closed

        with caplog.at_level(logging.WARNING, "shardstream"):
            began = time.monotonic()
            await asyncio.to_thread(flood)
            seconds = time.monotonic() - began
    refused = [r for r in caplog.records if "same-host lane refused" in r.getMessage()]
    assert 1 <= len(refused) <= 5 * (seconds + 1) + 1 < 300


async def test_opening_a_lane_needs_the_token(npz_root: Path, tmp_path: Path) -> None:
    import grpc

    from shardstream.client._security import CallMetadata, ClientSecurity

    token = tmp_path / "token"
    token.write_text("lane-secret\n")
    with worker_processes(npz_root, 1, "--auth-token-file", str(token)) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await WorkerStub(channel).open_lane(timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = CallMetadata(ClientSecurity(auth_token="lane-secret"))
            offer = await WorkerStub(channel, metadata).open_lane(timeout=5)
            assert offer.address and len(offer.ticket) == 32


async def test_slots_of_abandoned_reads_come_back(npz_root: Path) -> None:
    """Reads cut short (epochs left after two batches: their streams cancelled with
    chunks in flight, in slots the client never saw) hand their slots back: once the
    loader is quiet, the worker holds none of the lane's slots."""
    async with running_workers(npz_root, 1, processes=1, lane_slots=2) as (w,):
        async with Loader([w.address], **OPTIONS) as loader:
            for epoch in range(4):
                it = loader.epoch(epoch)
                for _ in range(2):
                    await anext(it)
            del it  # its batches ready (views of the lane) go with it
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 4)])
            assert w._lanes is not None
            (lane,) = w._lanes._lanes.values()
            # (Cancelled reads leave cycles, e.g. their tracebacks, that hold arrays until
            # the garbage collector runs.)
            await until(lambda: gc.collect() >= 0 and not lane._held)
            assert lane.alive and sorted(lane._free) == [0, 1] and lane.chunks > 0
    assert sorted(ids.tolist()) == list(range(RECORDS))


async def test_a_lane_short_of_slots_sends_the_rest_on_the_socket(npz_root: Path) -> None:
    """One slot, several reads at once: chunks that find it taken go as bytes; the epoch
    is the same either way."""
    async with running_workers(npz_root, 1, processes=1, lane_slots=1) as (w,):
        async with Loader(
            [w.address], **OPTIONS, same_host_lane=False, network_lane=False
        ) as loader:
            reference = await epoch_batches(loader, 0)
        async with Loader([w.address], **OPTIONS, max_inflight_reads=8) as loader:
            assert_same(await epoch_batches(loader, 0), reference)
            assert lane_bytes(loader) > 0


@pytest.fixture(scope="module")
def large_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 200 records of 3 KiB: reads far larger than a 64 KiB message."""
    from shardstream.server import make_dataset

    root = tmp_path_factory.mktemp("large")
    make_dataset(root, shards=2, records=400, shape=(32, 32, 3), format="npz")
    return root


# Reads of up to 256 records (~800 KB) where a message holds at most 21 (64 KiB).
LARGE = {"dataset": "train", "batch_size": 16, "read_bytes": 800_000,
         "max_message_bytes": 64 * 1024}  # fmt: skip


async def test_a_read_is_one_chunk_in_a_lane(large_root: Path) -> None:
    """In a lane a chunk is not bounded by the message size: each read comes as one chunk
    (one SharedChunk and one parse per read, not one per message's worth), the epoch
    byte-identical to the socket's, whose chunks keep to the loader's message size."""
    async with running_workers(large_root, 1, processes=1) as (w,):
        async with Loader([w.address], **LARGE, same_host_lane=False, network_lane=False) as loader:
            reference = await epoch_batches(loader, 0)
        async with Loader([w.address], **LARGE) as loader:
            assert_same(await epoch_batches(loader, 0), reference)
            assert w._lanes is not None
            (lane,) = w._lanes._lanes.values()
            before = lane.chunks
            assert_same(await epoch_batches(loader, 0), reference)
            reads = loader.plan(0).read_count
            # Reads of up to 256 records (800 KB), cut at the shard ends: [0, 200) of shard
            # 0, then [0, 56) and [56, 200) of shard 1; on the socket, 21 records a chunk.
            assert lane.chunks - before == reads == 3


async def test_a_read_short_of_slots_goes_on_in_messages(large_root: Path) -> None:
    """One slot, eight reads at once: a whole-read chunk that finds the slot taken is
    sent on the socket instead, in chunks the loader's message size holds (a message
    over it would fail the read: RESOURCE_EXHAUSTED); the epoch is the same."""
    async with running_workers(large_root, 1, processes=1, lane_slots=1) as (w,):
        async with Loader([w.address], **LARGE, same_host_lane=False, network_lane=False) as loader:
            reference = await epoch_batches(loader, 0)
        async with Loader([w.address], **LARGE, max_inflight_reads=8) as loader:
            kept = await epoch_batches(loader, 0)  # every batch kept: slots stay taken
            assert_same(kept, reference)
            assert 0 < lane_bytes(loader) < sum(sum(v.nbytes for v in b.values()) for b in kept)
            assert loader.statistics().resumes == 0


async def test_a_lane_keeps_to_the_workers_bounds_whatever_is_asked() -> None:
    """Slots hold what the client asks for (a whole read), at least a message and at most
    64 MiB, and a lane at most `lane_slots` x max message bytes in all: a client asking
    for more gets fewer, smaller slots, never more memory."""
    from shardstream.server._lanes import Lanes

    mib = 1 << 20
    lanes = Lanes(slots=4, slot_bytes=mib, max_lanes=8)
    lanes.start()
    try:
        offers = [lanes.offer(*ask) for ask in
                  [(0, 0), (100, 0), (4, 1 << 40), (4, 3 * mib), (2, 10), (3, mib + 1)]]  # fmt: skip
        sizes = [(o.slots, o.slot_bytes) for o in offers if o is not None]
        assert sizes == [(4, mib), (4, mib), (1, 4 * mib), (1, 3 * mib), (2, mib),
                         (3, mib + 4096)]  # fmt: skip
        big = Lanes(slots=1024, slot_bytes=mib, max_lanes=1)
        big.start()
        try:
            offer = big.offer(1024, 1 << 40)
            assert offer is not None and (offer.slots, offer.slot_bytes) == (16, 64 * mib)
        finally:
            big.close()
    finally:
        lanes.close()


def test_a_client_breaking_the_protocol_loses_its_lane() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        import mmap

        lane = Lane("0" * 16, 2, mmap.PAGESIZE, memoryview(mmap.mmap(-1, 2 * mmap.PAGESIZE)), b)
        slot = lane.acquire(7)
        assert slot is not None
        lane.written(slot, sent=True)
        a.send(struct.pack("<III", RELEASE, slot, 0))
        lane.on_readable()
        assert lane.alive and len(lane._free) == 2
        a.send(struct.pack("<III", END, 7, 1))
        lane.on_readable()
        assert lane.acquire(7) is None  # a read the client ended gets no slot
        a.send(struct.pack("<III", RELEASE, 1, 0))  # not held
        lane.on_readable()
        assert not lane.alive


# -- kills -------------------------------------------------------------------------------

CLIENT = killable_client("")


async def test_a_client_killed_mid_epoch_frees_its_lane(npz_root: Path) -> None:
    """SIGKILL of a loader's process mid-epoch: the worker sees its lane's socket close,
    ends the lane and keeps serving others through theirs."""
    with worker_processes(npz_root, 1, "--processes", "1") as (w,):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, w.address,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert await proc.stdout.readline() == b"reading\n"
            proc.kill()
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await until(lambda: any("closed: the client closed it" in line for line in w.log))
        async with Loader([w.address], **OPTIONS) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert lane_bytes(loader) > 0
        assert sorted(ids.tolist()) == list(range(RECORDS))


async def test_a_worker_killed_mid_epoch_is_resumed_elsewhere(npz_root: Path) -> None:
    """SIGKILL of a worker whose lane a loader reads through: its reads resume on the
    other worker; the epoch is exactly once and identical to one without kills."""
    with worker_processes(npz_root, 2, "--processes", "1") as (a, b):
        async with Loader([a.address, b.address], **OPTIONS) as loader:
            reference = await epoch_batches(loader, 0)
            got = []
            async for batch in loader.epoch(0):
                got.append(batch)
                if len(got) == 3:
                    a.proc.kill()
            assert a.proc.poll() == -signal.SIGKILL
        assert_same(got, reference)


async def until(condition: Any, within: float = 30.0) -> None:
    """Poll `condition` until true (bounds a hang only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.02)


def test_a_lane_whose_memory_could_shrink_is_refused() -> None:
    """A client maps the lane only if its memory holds what was offered and is sealed
    against shrinking (a file cut under a mapping is SIGBUS on the next read)."""
    from shardstream.client._lanes import _check_memory

    fd = os.memfd_create("test-lane", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 8192)
        with pytest.raises(ValueError, match="smaller than"):
            _check_memory(fd, 16384)
        with pytest.raises(ValueError, match="not sealed"):
            _check_memory(fd, 8192)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        _check_memory(fd, 8192)
    finally:
        os.close(fd)


@pytest.mark.parametrize("silent", [4, 300])
async def test_connections_that_send_no_ticket_hold_up_no_lane(
    npz_root: Path, caplog: pytest.LogCaptureFixture, silent: int
) -> None:
    """Local processes holding connections to the lane socket open without a word do not
    keep a loader from its lane: anyone on the host can connect. Was: 8 such connections
    took every handshake for 5 s each (the rest were closed at once), so loaders on the
    host read over the socket for as long as someone kept 8 open."""
    import grpc

    async with running_workers(npz_root, 1, processes=1) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            offer = await WorkerStub(channel).open_lane(timeout=5)
        held = []
        try:
            for _ in range(silent):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(s)
                s.connect("\0" + offer.address)
            with caplog.at_level("INFO", logger="shardstream.worker"):
                async with Loader([w.address], **OPTIONS) as loader:
                    (conn,) = loader._pool.conns
                    assert conn.lane is not None
                    await epoch_batches(loader, 0)
                    assert lane_bytes(loader) > 0
                    lane_id = conn.lane.id
        finally:
            for s in held:
                s.close()
    # The lane's id lets a token holder's reads take its slots: logs name a prefix only.
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"same-host lane {lane_id[:4]} open" in said and lane_id not in said


def test_a_worker_naming_a_slot_the_client_still_holds_is_caught() -> None:
    """A worker that writes a slot the client's arrays still view (it lost track of the
    slots, or ignores the client's hand-backs) changes batches already delivered, which
    no check of the new chunk can see. The reference it then sends names a slot this
    client has not handed back: a ValueError (the read's ProtocolError) instead of a
    silent change. A slot handed back (its arrays gone) may be named again."""
    import mmap

    from shardstream.client._lanes import _RECORD, ClientLane

    memory = mmap.mmap(-1, 4 * 1024)
    ours, theirs = socket.socketpair()
    lane = ClientLane("l" * 16, memory, 4, 1024, ours)
    try:
        stream = lane.new_stream()
        held = lane.take(0, 100, stream)
        other = lane.take(1, 100, stream)
        with pytest.raises(ValueError, match="slot 0, which this loader had not handed back"):
            lane.take(0, 100, stream)
        view = held[10:20]  # an array viewing the message keeps the slot too
        del held
        gc.collect()
        with pytest.raises(ValueError, match="slot 0"):
            lane.take(0, 100, stream)
        del view
        gc.collect()
        assert theirs.recv(_RECORD.size) == _RECORD.pack(RELEASE, 0, 0)
        again = lane.take(0, 100, stream)  # handed back: the worker may use it again
        assert len(again) == 100 and len(other) == 100
    finally:
        lane.close()
        theirs.close()


# -- what a client can hold of the worker ----------------------------------------------


async def hand_lane(stub: WorkerStub) -> tuple[LaneOffer, socket.socket, int]:
    """A lane opened by hand: its offer, its control socket and the client's memfd."""
    offer = await stub.open_lane(timeout=5)

    def connect() -> tuple[socket.socket, int]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect("\0" + offer.address)
        s.sendall(offer.lane.encode() + offer.ticket)
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
        assert len(fds) == 1
        return s, fds[0]

    sock, fd = await asyncio.to_thread(connect)
    return offer, sock, fd


async def lane_read(channel: Any, shard: str, count: int, lane: str, stream: int,
                    lane_chunk_records: int = 0) -> list[Any]:  # fmt: skip
    """A read of `count` records of `shard` naming `lane`: its messages, decoded."""
    from shardstream.v1 import shardstream_pb2 as pb

    request = pb.ReadRequest(dataset="train", shard=shard, start=0, count=count, lane=lane,
                             lane_stream=stream, lane_chunk_records=lane_chunk_records)  # fmt: skip
    call = channel.unary_stream("/shardstream.v1.Worker/Read")(request.SerializeToString())
    return [pb.ReadResponse.FromString(m) async for m in call]


def allocated(fd: int) -> int:
    """Bytes of memory a memfd holds now."""
    return os.fstat(fd).st_blocks * 512


@pytest.mark.parametrize("processes", [0, 1])
async def test_lane_chunks_keep_to_the_clients_lane_chunk_records(
    npz_root: Path, processes: int
) -> None:
    """`lane_chunk_records` is the most records a chunk in the lane holds, also where a
    message would hold more (before: raised to the socket's chunk, ignoring the client)."""
    import grpc

    async with running_workers(npz_root, 1, processes=processes) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            stub = WorkerStub(channel)
            shard = (await stub.describe("train", timeout=5)).shards[0].id
            offer, sock, fd = await hand_lane(stub)
            try:
                assert w._lanes is not None
                await until(lambda: w._lanes is not None and w._lanes.get(offer.lane) is not None)
                messages = await lane_read(channel, shard, 100, offer.lane, 1, lane_chunk_records=7)
            finally:
                sock.close()
                os.close(fd)
    counts = [m.shared.count for m in messages if m.HasField("shared")]
    assert counts and max(counts) <= 7
    assert sum(counts) + sum(m.chunk.count for m in messages if m.HasField("chunk")) == 100
    assert messages[-1].end.records_sent == 100


def test_a_client_that_never_ends_its_reads_loses_its_lane() -> None:
    """A client that hands every slot back but never says it is done with a read (no END):
    the worker's records of its reads stay bounded and, once over the bound, the lane is
    closed, loudly (before: ~190 bytes kept per read, for as long as the lane lived)."""
    import mmap

    from shardstream.server._lanes import MAX_OPEN_READS

    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        lane = Lane("0" * 16, 2, mmap.PAGESIZE, memoryview(mmap.mmap(-1, 2 * mmap.PAGESIZE)), b)
        for stream in range(1, 2 * MAX_OPEN_READS):  # a well-behaved client first: it ends them
            slot = lane.acquire(stream)
            assert slot is not None
            lane.written(slot, sent=True)
            a.send(struct.pack("<III", RELEASE, slot, 0) + struct.pack("<III", END, stream, 1))
            lane.on_readable()
        assert lane.alive and lane._sent == {}
        for stream in range(2 * MAX_OPEN_READS, 4 * MAX_OPEN_READS):
            slot = lane.acquire(stream)
            if slot is None:
                break
            lane.written(slot, sent=True)
            assert len(lane._sent) <= MAX_OPEN_READS
            if not lane.alive:
                break
            a.send(struct.pack("<III", RELEASE, slot, 0))
            lane.on_readable()
        assert not lane.alive and stream == 2 * MAX_OPEN_READS + MAX_OPEN_READS
        assert lane._sent == {}


async def test_a_lane_ended_hands_back_the_slots_its_client_let_go(npz_root: Path) -> None:
    """When a lane ends, the pages of the slots its client handed back (or never got) are
    freed at once, although the client still has the memfd; what it still holds stays
    counted against the worker's lane budget (before: every page written stayed)."""
    import grpc

    async with running_workers(npz_root, 1, lane_slots=4) as (w,):
        assert w._lanes is not None
        lanes = w._lanes
        async with grpc.aio.insecure_channel(w.address) as channel:
            stub = WorkerStub(channel)
            shards = [s.id for s in (await stub.describe("train", timeout=5)).shards]
            offer, sock, fd = await hand_lane(stub)
            try:
                await until(lambda: lanes.get(offer.lane) is not None)
                slots = []
                for stream, shard in enumerate(shards[:3], 1):
                    messages = await lane_read(channel, shard, 200, offer.lane, stream)
                    slots += [m.shared.slot for m in messages if m.HasField("shared")]
                    sock.sendall(struct.pack("<III", END, stream, len(messages) - 1))
                assert len(slots) == 3
                for slot in slots[1:]:  # the first one kept, as by a batch still in use
                    sock.sendall(struct.pack("<III", RELEASE, slot, 0))
                written = allocated(fd)
                assert written > 0
                sock.close()
                await until(lambda: lanes.get(offer.lane) is None)
                left = allocated(fd)
                assert 0 < left <= written // 3 + mmap_page()
                assert lanes.kept_bytes() == left
            finally:
                os.close(fd)


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


async def test_ended_lanes_a_client_keeps_stay_within_the_budget(npz_root: Path) -> None:
    """A same-host client that ends lanes holding their slots and keeps each memfd (so
    the pages the worker wrote stay alive) gets at most `max_lanes` of them: then no lane
    is offered, and the memory it holds stays within the lanes' budget; once it lets
    the memfds go, lanes are offered again (before: a new lane after every one it ended,
    the worker's memory held by the client growing without bound)."""
    import grpc

    async with running_workers(npz_root, 1, lane_slots=2, max_lanes=2) as (w,):
        assert w._lanes is not None
        lanes = w._lanes
        async with grpc.aio.insecure_channel(w.address) as channel:
            stub = WorkerStub(channel)
            shard = (await stub.describe("train", timeout=5)).shards[0].id
            fds: list[int] = []
            refused = 0
            try:
                for _ in range(6):
                    try:
                        offer, sock, fd = await hand_lane(stub)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                        assert "no same-host lane to give" in (exc.details() or "")
                        refused += 1
                        continue
                    fds.append(fd)
                    with sock:
                        await until(lambda: lanes.get(offer.lane) is not None)  # noqa: B023
                        messages = await lane_read(channel, shard, 200, offer.lane, 1)
                        assert any(m.HasField("shared") for m in messages)
                    await until(lambda: lanes.get(offer.lane) is None)  # noqa: B023
                assert (len(fds), refused) == (2, 4)
                held = sum(allocated(fd) for fd in fds)
                assert 0 < held == lanes.kept_bytes()
                assert held <= 2 * 2 * offer.slot_bytes
            finally:
                for fd in fds:
                    os.close(fd)

            async def offered() -> bool:
                try:
                    _, sock, fd = await hand_lane(stub)
                except grpc.aio.AioRpcError:
                    return False
                sock.close()
                os.close(fd)
                return True

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not await offered():  # ended lanes are looked at once a second at most
                assert loop.time() < deadline, "no lane offered once the memfds were let go"
                await asyncio.sleep(0.1)
            assert lanes.kept_bytes() == 0


def lane_mappings() -> list[str]:
    """This process's mappings and descriptors of lane memory."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the listing's own descriptor
    with open("/proc/self/maps") as maps:
        mapped = [line.split(None, 5)[-1].strip() for line in maps]
    return [m for m in fds + mapped if "shardstream-lane" in m]


@pytest.mark.parametrize("consumed", ["whole", "abandoned"])
@pytest.mark.parametrize("api", ["Loader", "SyncLoader"])
async def test_a_closed_loader_unmaps_its_lanes(npz_root: Path, api: str, consumed: str) -> None:
    """A worker counts a lane's memory against its budget while the client maps it. Once
    a loader is closed, and its caller holds none of its batches, the mapping is gone at
    once: it used to stay until a garbage collection ran (a cycle of the loader's, or of
    the reads cancelled mid-epoch), and a process opening and closing loaders held one
    lane after another."""
    assert lane_mappings() == []
    with worker_processes(npz_root, 1) as (w,):
        for _ in range(2):
            if api == "Loader":
                async with Loader([w.address], **OPTIONS) as loader:
                    async for step, batch in aenumerate(loader.epoch(0)):
                        assert batch and lane_mappings() != []  # the lane is in use
                        if consumed == "abandoned" and step == 2:
                            break
                    del batch
            else:

                def run() -> None:
                    with SyncLoader([w.address], **OPTIONS) as sync:
                        for step, batch in enumerate(sync.epoch(0)):
                            assert batch and lane_mappings() != []
                            if consumed == "abandoned" and step == 2:
                                break
                        del batch

                await asyncio.to_thread(run)
            assert lane_mappings() == []


async def test_batches_held_past_close_unmap_when_they_go_though_the_loader_stays(
    npz_root: Path,
) -> None:
    """Batches kept after close() keep the lane mapped, as documented; once they go, the
    mapping goes, though the closed loader object lives on (a trainer keeping its data
    loaders). Was: mapped until the loader object itself went, and the worker counted
    the lane against --max-lanes all that while (later loaders got no lane)."""
    assert lane_mappings() == []
    with worker_processes(npz_root, 1) as (w,):
        loader = Loader([w.address], **OPTIONS)
        async with loader:
            kept = [b async for _, b in aenumerate(loader.epoch(0)) if _ < 3]
        assert not kept[0]["image"].flags.writeable  # views of the lane's memory
        assert lane_mappings() != []  # held by the batches
        del kept
        assert lane_mappings() == [] and loader.closed


def test_batches_held_past_a_sync_loaders_close_unmap_when_they_go(npz_root: Path) -> None:
    """The same through SyncLoader, whose position keeps its last epoch's iterator: a
    batch that iterator had taken ahead (a cancelled wait's) held the lane too."""
    assert lane_mappings() == []
    with worker_processes(npz_root, 1) as (w,):
        sync = SyncLoader([w.address], **OPTIONS)
        with sync:
            kept = [b for _, b in zip(range(3), sync.epoch(0), strict=False)]
        assert not kept[0]["image"].flags.writeable
        assert lane_mappings() != []
        del kept
        assert lane_mappings() == [] and sync.closed


async def aenumerate(items: Any) -> Any:
    step = 0
    async for item in items:
        yield step, item
        step += 1


async def test_a_worker_out_of_descriptors_does_not_spin_on_its_lane_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accept() failing with EMFILE leaves the connection queued and the socket readable:
    the lane thread now pauses between tries. Was: ~977,000 failed accepts and a core's
    worth of CPU a second, fighting the event loop for the GIL."""
    import errno

    from shardstream.server import _lanes

    tries = [0]

    def out_of_descriptors(self: socket.socket) -> Any:
        tries[0] += 1
        raise OSError(errno.EMFILE, "Too many open files")

    lanes = _lanes.Lanes(slots=2, slot_bytes=1 << 20, max_lanes=2)
    lanes.start()
    monkeypatch.setattr(socket.socket, "accept", out_of_descriptors)
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        waiting.connect("\0" + lanes.address)
        await until(lambda: tries[0] >= 3)
        t0, before = time.monotonic(), tries[0]
        await asyncio.sleep(0.5)  # a window to count tries in, not a wait for a condition
        span = time.monotonic() - t0
    finally:
        monkeypatch.undo()
        waiting.close()
        lanes.close()
    assert tries[0] - before <= span / 0.05 + 5, tries[0] - before  # a pause of 50 ms
