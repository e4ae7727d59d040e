"""Network lanes: chunks from a worker on another host over a plain TCP connection beside
the gRPC one, into slots of the client's own memory (`_lanes`). Loaders here turn the
same-host lane off, so they take the path a remote worker's loader takes; what they get
must be byte-identical to the gRPC stream's bytes, through `Loader`, `SyncLoader` and the
torch iterable, and survive kills, a client that stops reading, and a lying worker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from lane_helpers import OPTIONS, assert_same, epoch_batches, killable_client, lane_bytes

from shardstream.client import Loader, SyncLoader
from shardstream.client._lanes import LaneClosedError, NetworkLane
from shardstream.client._wire import Piece, StreamEnd, WorkerStub, decode_response, encode_read
from shardstream.server import Worker

from conftest import RECORDS, running_workers, until, worker_processes

REMOTE: dict[str, Any] = {**OPTIONS, "same_host_lane": False}  # as from another host
BYTES: dict[str, Any] = {**REMOTE, "network_lane": False}  # every byte on the gRPC stream
FRAME = struct.Struct("<IIQQ")


def network_lanes(w: Worker) -> list[Any]:
    assert w._network_lanes is not None
    return [lane for lane in w._network_lanes._lanes.values() if lane.alive]


@pytest.mark.parametrize("processes", [0, 1])
async def test_a_remote_loader_gets_chunks_through_its_network_lane(
    npz_root: Path, processes: int
) -> None:
    """Same-host lane off (a worker on another host): chunks come through the network
    lane, each read one frame, and the epochs are those of the gRPC stream, shuffled
    ones included."""
    async with running_workers(npz_root, 1, processes=processes) as (w,):
        async with Loader([w.address], **BYTES, shuffle=True, seed=3) as loader:
            reference = [await epoch_batches(loader, e) for e in (0, 1)]
            assert lane_bytes(loader) == 0 and network_lanes(w) == []
        async with Loader([w.address], **REMOTE, shuffle=True, seed=3) as loader:
            for e in (0, 1):
                assert_same(await epoch_batches(loader, e), reference[e])
            assert lane_bytes(loader) > 0
            (lane,) = network_lanes(w)
            conn = loader._pool.conns[0]
            assert isinstance(conn.lane, NetworkLane) and conn.lane.alive
            assert lane.chunks > 0
            if processes:  # stored npz read straight from the file: a frame per read
                before = lane.chunks  # (batches kept above keep their slots: not here)
                ids = [b["id"].copy() async for b in loader.epoch(2)]
                assert lane.chunks - before == loader.plan(2).read_count
                assert sorted(np.concatenate(ids).tolist()) == list(range(RECORDS))
        await until(lambda: network_lanes(w) == [], 10, "the lane ends with the loader")


def test_a_sync_loader_and_the_torch_iterable_take_the_network_lane(npz_root: Path) -> None:
    """The user's other paths, `SyncLoader` and the torch iterable, through the network
    lane of a worker process: every record once, as over the gRPC stream."""
    with worker_processes(npz_root, 1, "--processes", "1", "--lanes", "off") as (w,):
        with SyncLoader([w.address], **BYTES) as loader:
            reference = list(loader.epoch(0))
        with SyncLoader([w.address], **OPTIONS) as loader:  # (its lane: a network one)
            assert_same(list(loader.epoch(0)), reference)
            assert lane_bytes(loader) > 0
        torch = pytest.importorskip("torch")
        from shardstream.client.torch import ShardstreamIterable

        data = ShardstreamIterable([w.address], **OPTIONS)
        try:
            ids = torch.cat([b["id"] for b in data]).tolist()
        finally:
            data.close()
        assert sorted(ids) == list(range(RECORDS))


async def test_decoded_chunks_go_through_the_network_lane(csv_root: Path) -> None:
    """Chunks a worker decodes (csv, here in its threads) go through the lane one
    message at a time, the same bytes as on the stream."""
    options = {"dataset": "t", "batch_size": 50, "same_host_lane": False}
    async with running_workers(csv_root, 1, datasets=("t=part-*:csv",)) as (w,):
        async with Loader([w.address], **options, network_lane=False) as loader:
            reference = await epoch_batches(loader, 0)
        async with Loader([w.address], **options) as loader:
            assert_same(await epoch_batches(loader, 0), reference)
            assert lane_bytes(loader) > 0


async def test_a_network_lane_short_of_slots_sends_the_rest_as_bytes(npz_root: Path) -> None:
    """One slot, eight reads at once: a whole-read chunk that finds the slot taken goes on
    the stream in messages; the epoch is the same."""
    async with running_workers(npz_root, 1, processes=1, lane_slots=1) as (w,):
        async with Loader([w.address], **BYTES) as loader:
            reference = await epoch_batches(loader, 0)
        async with Loader([w.address], **REMOTE, max_inflight_reads=8) as loader:
            assert_same(await epoch_batches(loader, 0), reference)
            (lane,) = network_lanes(w)
            assert 0 < lane.chunks < loader.plan(0).read_count


async def test_no_network_lane_where_it_is_turned_off(npz_root: Path) -> None:
    """`network_lane=False` on the loader, or `--network-lanes off` on the worker: every
    chunk on the gRPC stream, exactly once. `--lanes off` leaves network lanes on."""
    async with running_workers(npz_root, 1, processes=1) as (w,):
        async with Loader([w.address], **BYTES) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert lane_bytes(loader) == 0 and loader._pool.conns[0].lane is None
    assert sorted(ids.tolist()) == list(range(RECORDS))
    async with running_workers(npz_root, 1, processes=1, network_lanes=False) as (w,):
        assert w._network_lanes is None
        async with grpc.aio.insecure_channel(w.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError, match="--network-lanes off") as refused:
                await WorkerStub(channel).open_lane(timeout=5, network=True)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        async with Loader([w.address], **REMOTE) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert lane_bytes(loader) == 0
    assert sorted(ids.tolist()) == list(range(RECORDS))
    async with running_workers(npz_root, 1, processes=1, lanes=False) as (w,):
        async with Loader([w.address], **OPTIONS) as loader:
            await epoch_batches(loader, 0)
            assert isinstance(loader._pool.conns[0].lane, NetworkLane)


async def test_a_fixed_port_and_a_taken_one(npz_root: Path) -> None:
    """`--network-lane-port` is the port OpenLane offers; a port already taken leaves the
    worker serving without network lanes (a warning), not failing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with running_workers(npz_root, 1, network_lane_port=port) as (w,):
            assert w._network_lanes is None
            async with Loader([w.address], **REMOTE) as loader:
                await epoch_batches(loader, 0)
                assert lane_bytes(loader) == 0
    async with running_workers(npz_root, 1, network_lane_port=port) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            offer = await WorkerStub(channel).open_lane(timeout=5, network=True)
        assert offer.port == port and offer.address == ""


async def test_tickets_on_the_network_port_are_single_use(npz_root: Path) -> None:
    """The lane's port admits only a connection showing the ticket OpenLane gave, once:
    a wrong ticket, or the right one again, gets the connection closed."""
    async with running_workers(npz_root, 1, processes=1) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            offer = await WorkerStub(channel).open_lane(timeout=5, network=True)

        def attempt(ticket: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", offer.port), timeout=10) as s:
                s.sendall(offer.lane.encode() + ticket)
                return s.recv(1)

        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, attempt, bytes(32)) == b""
        assert await loop.run_in_executor(None, attempt, offer.ticket) == b"\1"
        assert await loop.run_in_executor(None, attempt, offer.ticket) == b""


async def test_tls_has_no_network_lane(npz_root: Path, tmp_path: Path) -> None:
    """A worker serving TLS offers no network lane (its bytes would go unencrypted), and
    a loader using TLS asks for none: every chunk comes on the encrypted stream."""
    from shardstream.client._security import ClientSecurity
    from shardstream.server._security import ServerSecurity

    from tls_certs import make_certs

    certs = make_certs(tmp_path / "tls")
    security = ServerSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key)
    async with running_workers(npz_root, 1, processes=1, security=security, lanes=False) as (w,):
        assert w._network_lanes is None
        client = ClientSecurity(tls_ca=certs.ca_cert, tls_server_name="localhost")
        async with Loader([w.address], **OPTIONS, security=client) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert loader._pool.conns[0].lane is None and lane_bytes(loader) == 0
    assert sorted(ids.tolist()) == list(range(RECORDS))


# -- faults ------------------------------------------------------------------------------

CLIENT = killable_client("same_host_lane=False")


async def test_a_client_killed_mid_epoch_frees_its_network_lane(npz_root: Path) -> None:
    """SIGKILL of a loader's process mid-epoch: the worker sees the lane's connection
    close, ends the lane, and serves the next loader through a new one."""
    async with running_workers(npz_root, 1, processes=1) as (w,):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, w.address,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert await proc.stdout.readline() == b"reading\n"
            assert len(network_lanes(w)) == 1
            proc.kill()
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await until(lambda: network_lanes(w) == [], 10, "the killed client's lane ends")
        async with Loader([w.address], **REMOTE) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert lane_bytes(loader) > 0
        assert sorted(ids.tolist()) == list(range(RECORDS))


@pytest.mark.parametrize("api", ["Loader", "SyncLoader"])
async def test_a_worker_killed_mid_epoch_is_resumed_elsewhere(npz_root: Path, api: str) -> None:
    """SIGKILL of a worker whose network lane a loader reads through (frames and
    SharedChunks in flight): its reads resume on the other worker; the epoch is exactly
    once and identical to one without kills."""
    with worker_processes(npz_root, 2, "--processes", "1", "--lanes", "off") as (a, b):
        if api == "SyncLoader":
            with SyncLoader([a.address, b.address], **OPTIONS) as sync:
                reference = list(sync.epoch(0))
                got = []
                for batch in sync.epoch(0):
                    got.append(batch)
                    if len(got) == 3:
                        a.proc.kill()
                assert lane_bytes(sync) > 0
        else:
            async with Loader([a.address, b.address], **OPTIONS) as loader:
                reference = await epoch_batches(loader, 0)
                got = []
                async for batch in loader.epoch(0):
                    got.append(batch)
                    if len(got) == 3:
                        a.proc.kill()
                assert lane_bytes(loader) > 0
        assert a.proc.wait(10) == -9
    assert_same(got, reference)


async def test_a_client_that_stops_reading_its_lane_loses_it(big_root: Path) -> None:
    """A client that opens a network lane, names it in its reads and never reads the
    lane's connection: the worker's frame (6.5 MB: more than the sockets' buffers hold)
    waits at most the stall timeout, then the lane ends and the read goes on in messages
    on the stream, whole."""
    async with running_workers(big_root, 1, processes=1, stream_stall_timeout=1.0) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            stub = WorkerStub(channel)
            info = await stub.describe("train", timeout=5)
            offer = await stub.open_lane(timeout=5, slots=4, slot_bytes=1 << 20, network=True)
            sock = socket.socket()
            try:
                request = await read_naming_a_lane(stub, info, offer, sock)
                messages = [m async for m in stub.read(request)]
            finally:
                sock.close()
        assert network_lanes(w) == []
        counted = 0
        for m in messages:
            item = decode_response(m)
            if isinstance(item, Piece):
                counted += item.count
            else:
                assert isinstance(item, StreamEnd) and not item.draining
        assert counted == info.shards[0].records


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 200 records of 32 KiB: a read of a shard is 6.5 MB."""
    from shardstream.server import make_dataset

    root = tmp_path_factory.mktemp("big")
    make_dataset(root, shards=2, records=400, shape=(128, 128, 2), format="npz")
    return root


# -- a lying worker ----------------------------------------------------------------------


async def test_a_frame_outside_the_lane_or_into_a_held_slot_ends_it() -> None:
    """The client's side against a worker that lies: a frame for a slot outside the lane,
    or for one that delivered arrays still view, ends the lane (its waiters learn why)
    and leaves what was delivered as it was."""
    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 2, 64, b)
    try:
        a.sendall(FRAME.pack(0, 1, 0, 8) + b"A" * 8)
        await asyncio.wait_for(lane.arrival(0, 1), 10)
        held = lane.take(0, 8, 1)
        assert bytes(held) == b"A" * 8
        waiting = asyncio.ensure_future(lane.arrival(1, 1))
        a.sendall(FRAME.pack(0, 1, 1, 8) + b"B" * 8)  # slot 0: `held` still views it
        with pytest.raises(LaneClosedError, match="still view"):
            await asyncio.wait_for(waiting, 10)
        assert not lane.alive and bytes(held) == b"A" * 8
    finally:
        lane.close()
        a.close()
    for frame in (FRAME.pack(5, 1, 0, 8) + b"C" * 8, FRAME.pack(0, 1, 0, 65) + b"D" * 65):
        a, b = socket.socketpair()  # a slot past the lane's two; more than a slot holds
        lane = NetworkLane("0" * 16, 2, 64, b)
        try:
            waiting = asyncio.ensure_future(lane.arrival(0, 1))
            a.sendall(frame)
            with pytest.raises(LaneClosedError, match="outside the lane"):
                await asyncio.wait_for(waiting, 10)
        finally:
            lane.close()
            a.close()


async def test_a_frame_is_taken_only_as_the_chunk_it_was_sent_for() -> None:
    """A stale frame in a slot (of a read that ended, or an earlier chunk) is never taken
    as another: `take` refuses a slot that does not hold the frame named, and a frame
    cut short by the worker's end wakes the read's wait with the lane's end."""
    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 2, 64, b)
    try:
        stream = lane.new_stream()
        a.sendall(FRAME.pack(1, stream + 7, 0, 4) + b"old!")  # another read's
        a.sendall(FRAME.pack(0, stream, 0, 4) + b"new!")
        await asyncio.wait_for(lane.arrival(0, stream), 10)
        with pytest.raises(ValueError, match="does not hold the frame"):
            lane.take(1, 4, stream)
        assert bytes(lane.take(0, 4, stream)) == b"new!"
        waiting = asyncio.ensure_future(lane.arrival(1, stream))
        a.sendall(FRAME.pack(1, stream, 1, 16) + b"cut")  # then the worker is gone
        a.close()
        with pytest.raises(LaneClosedError, match="the worker closed it"):
            await asyncio.wait_for(waiting, 10)
    finally:
        lane.close()
        a.close()
    assert not lane.mapped


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # (JAX's, if imported before)
async def test_a_forked_child_leaves_the_parents_lane_alone() -> None:
    """A child forked while a loader holds a network lane (a DataLoader worker, say) that
    closes it closes only its own descriptor: the parent's lane still receives frames
    (a shutdown of the shared connection would end it)."""
    import os

    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 2, 64, b)
    try:
        pid = os.fork()
        if pid == 0:  # the child
            try:
                lane.close("a forked child")
            finally:
                os._exit(0)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        a.sendall(FRAME.pack(0, 1, 0, 5) + b"alive")
        await asyncio.wait_for(lane.arrival(0, 1), 10)
        assert lane.alive and bytes(lane.take(0, 5, 1)) == b"alive"
    finally:
        lane.close()
        a.close()


async def test_a_lane_port_that_hangs_does_not_hold_the_loader_up(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A firewall that drops the lane port's packets leaves the lane's connect hanging (up
    to its timeout): the loader starts without waiting for it and reads on the gRPC
    stream; the lane is taken once it opens."""
    import threading

    from shardstream.client import _lanes

    real = _lanes._connect_network
    release = threading.Event()

    def dropped(host: str, offer: Any, timeout: float) -> socket.socket:
        assert release.wait(60)  # the SYNs get no answer until the test lets them
        return real(host, offer, timeout)

    monkeypatch.setattr(_lanes, "_connect_network", dropped)
    async with running_workers(npz_root, 1, processes=1) as (w,):
        try:
            async with Loader([w.address], **REMOTE) as loader:
                conn = loader._pool.conns[0]
                ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
                assert conn.lane is None and lane_bytes(loader) == 0
                release.set()
                await until(lambda: isinstance(conn.lane, NetworkLane), 10, "the lane opens")
                await epoch_batches(loader, 1)
                assert lane_bytes(loader) > 0
        finally:
            release.set()
    assert sorted(ids.tolist()) == list(range(RECORDS))


# -- attacks from the red-team ----------------------------------------------------------


async def test_a_flood_on_the_lane_port_leaves_it_accepting(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections that send a byte and no ticket, opened as fast as two threads can:
    each is refused (the oldest crowded out), the accepting thread lives on, and an
    honest client's handshake then succeeds. (A connection crowded out while its own
    readable event was in the same batch killed the thread: no lane ever again.)"""
    import threading

    from shardstream.server import _lanes

    monkeypatch.setattr(_lanes, "PENDING_HANDSHAKES", 2)  # crowding out at every accept
    async with running_workers(npz_root, 1) as (w,):
        lanes = w._network_lanes
        assert lanes is not None and lanes._thread is not None
        stop = threading.Event()

        def flood() -> None:
            socks: list[socket.socket] = []
            try:
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        s = socket.create_connection(("127.0.0.1", lanes.port), timeout=1)
                        socks.append(s)
                        s.send(b"x")
                    if len(socks) > 200:
                        for s in socks:
                            s.close()
                        socks.clear()
            finally:
                for s in socks:
                    s.close()

        threads = [threading.Thread(target=flood) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            await asyncio.sleep(2)  # the attack's length
        finally:
            stop.set()
            await asyncio.to_thread(lambda: [t.join() for t in threads])
        assert lanes._thread.is_alive()
        async with Loader([w.address], **REMOTE) as loader:
            await until(lambda: loader._pool.conns[0].lane is not None, 10, "a lane opens")
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert lane_bytes(loader) > 0
    assert sorted(ids.tolist()) == list(range(RECORDS))


async def test_clients_that_stop_reading_do_not_stall_another_clients_lane(
    big_root: Path,
) -> None:
    """Six clients with network lanes whose reads name them and who never read the lanes'
    connections (frames blocked for the whole stall timeout, a minute here): an honest
    loader's frames do not wait behind theirs (each lane sends in its own thread)."""
    async with running_workers(big_root, 1, processes=1, stream_stall_timeout=60.0) as (w,):
        async with grpc.aio.insecure_channel(w.address) as channel:
            stub = WorkerStub(channel)
            info = await stub.describe("train", timeout=5)
            socks, stuck = [], []
            try:
                for _ in range(6):
                    offer = await stub.open_lane(
                        timeout=5, slots=4, slot_bytes=1 << 20, network=True
                    )
                    sock = socket.socket()
                    socks.append(sock)
                    request = await read_naming_a_lane(stub, info, offer, sock)
                    call = stub.read(request)
                    stuck.append(call)
                    stuck_read = asyncio.ensure_future(call.read())  # its first frame blocks
                    stuck.append(stuck_read)
                await until(
                    lambda: sum(lane._in_flight for lane in network_lanes(w)) == 6,
                    10,
                    "six frames blocked",
                )
                options = {"dataset": "train", "batch_size": 20, "same_host_lane": False}
                async with Loader([w.address], **options) as loader:
                    ids = await asyncio.wait_for(
                        _ids_of_epoch(loader), 30
                    )  # (the stuck frames' stall timeout is 60 s)
                    assert lane_bytes(loader) > 0
            finally:
                for item in stuck:
                    item.cancel()
                for sock in socks:
                    sock.close()
    assert sorted(ids) == list(range(400))


async def read_naming_a_lane(stub: WorkerStub, info: Any, offer: Any, sock: socket.socket) -> bytes:
    """Open the network lane `offer` on `sock` as a client that will never read it (its
    receive buffer as small as can be, so frames block at once), and a ReadRequest of
    the whole first shard naming it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def handshake() -> bytes:  # (in a thread: the worker may run on this loop)
        sock.connect(("127.0.0.1", offer.port))
        sock.sendall(offer.lane.encode() + offer.ticket)
        return sock.recv(1)

    assert await asyncio.get_running_loop().run_in_executor(None, handshake) == b"\1"
    shard = info.shards[0]
    return encode_read(
        dataset="train", shard=shard.id, start=0, count=shard.records, seed=0,
        fingerprint=shard.fingerprint, max_chunk_records=16, epoch=0,
        lane=offer.lane, lane_stream=1, lane_chunk_records=shard.records,
        dataset_fingerprint=info.fingerprint,
    )  # fmt: skip


async def _ids_of_epoch(loader: Loader, epoch: int = 0) -> list[int]:
    return sorted([int(i) async for b in loader.epoch(epoch) for i in b["id"]])


async def test_a_restarted_worker_gives_its_loader_a_lane_again(npz_root: Path) -> None:
    """A worker killed and restarted on its ports while its loader reads: the loader's
    try at a new lane while the worker was down fails, and it asks again once the worker
    serves, so later epochs come through a network lane again."""
    from shardstream.server._process import WorkerProcess

    args = ["--data-root", str(npz_root), "--dataset", "train=*.npz", "--processes", "1",
            "--chunk-bytes", "16384", "--lanes", "off"]  # fmt: skip
    with WorkerProcess.start(args) as first:
        port = first.port
        async with Loader([first.address], **OPTIONS, backoff_cap=0.2) as loader:
            conn = loader._pool.conns[0]
            await until(lambda: isinstance(conn.lane, NetworkLane), 10, "a lane")
            first.proc.kill()
            first.proc.wait(10)
            epoch = asyncio.ensure_future(_ids_of_epoch(loader))  # (ids: no batch kept)
            await until(lambda: conn.lane is None or not conn.lane.alive, 10, "the lane ends")
            with WorkerProcess.start([*args, "--port", str(port)]):
                ids = await asyncio.wait_for(epoch, 60)
                await until(
                    lambda: isinstance(conn.lane, NetworkLane) and conn.lane.alive,
                    10,
                    "a lane from the restarted worker",
                )
                before = lane_bytes(loader)
                await _ids_of_epoch(loader, 1)
                assert lane_bytes(loader) > before
    assert ids == list(range(RECORDS))


# -- review findings ---------------------------------------------------------------------


async def test_a_closed_lane_refuses_its_chunks_as_a_closed_lane() -> None:
    """A lane closed under a read (another read found it dead and let it go) whose frame
    had arrived: waiting for, or taking, that chunk is a LaneClosedError (the read then
    resumes), not a RuntimeError that fails the loader."""
    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 2, 64, b)
    try:
        a.sendall(FRAME.pack(0, 1, 0, 4) + b"data")
        await asyncio.wait_for(lane.arrival(0, 1), 10)
        lane.close("another read let it go")
        with pytest.raises(LaneClosedError):
            await lane.arrival(0, 1)
        with pytest.raises(LaneClosedError):
            lane.take(0, 4, 1)
    finally:
        lane.close()
        a.close()


async def test_a_batch_freed_inside_the_lanes_own_lock_hands_its_slot_back_later() -> None:
    """The garbage collector can free a batch (its finalizer) while the lane's own thread
    holds the lane's lock: the slot is queued, not a deadlock, and goes back to the
    worker (a RELEASE record) at the lane's next take or end."""
    import threading

    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 2, 64, b)
    try:
        stream = lane.new_stream()
        a.sendall(FRAME.pack(1, stream, 0, 4) + b"held")
        await asyncio.wait_for(lane.arrival(1, stream), 10)
        held = [lane.take(1, 4, stream)]

        def free_while_locked() -> None:
            with lane._lock:
                held.clear()  # the finalizer runs here, in this locked section

        t = threading.Thread(target=free_while_locked)
        t.start()
        await asyncio.to_thread(t.join, 10)
        assert not t.is_alive(), "the finalizer deadlocked on the lane's lock"
        lane.end(stream)
        a.settimeout(10)
        records = a.recv(24)
        assert struct.unpack("<IIIIII", records) == (1, 1, 0, 2, stream, 1)  # RELEASE, END
    finally:
        lane.close()
        a.close()


async def test_a_lane_that_cannot_be_made_leaves_the_stream(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No memory for a network lane's slots (ENOMEM under an address-space limit): the
    loader reads on the gRPC stream, exactly once, instead of failing."""
    import errno

    from shardstream.client import _lanes

    def no_memory(*_: Any) -> NetworkLane:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(_lanes, "NetworkLane", no_memory)
    async with running_workers(npz_root, 1, processes=1) as (w,):
        async with Loader([w.address], **REMOTE) as loader:
            ids = np.concatenate([b["id"] for b in await epoch_batches(loader, 0)])
            assert loader._pool.conns[0].lane is None and lane_bytes(loader) == 0
    assert sorted(ids.tolist()) == list(range(RECORDS))


def resident_slots(lane: NetworkLane, slots: int, slot_bytes: int) -> list[bool]:
    """Per slot: whether all its pages are in memory (mincore on the lane's mapping)."""
    import ctypes

    from shardstream.client._lanes import _address

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    assert lane._memory is not None
    pages = slots * slot_bytes // 4096
    vector = ctypes.create_string_buffer(pages)
    assert libc.mincore(_address(lane._memory), slots * slot_bytes, vector) == 0
    per_slot = slot_bytes // 4096
    return [all(b & 1 for b in vector.raw[s * per_slot : (s + 1) * per_slot]) for s in range(slots)]


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
async def test_a_lanes_slots_are_made_ready_just_ahead_of_its_frames() -> None:
    """A second thread takes the pages of the slot the worker writes next (one beyond
    the highest written; several pieces a slot), so frames do not land in fresh
    memory; nothing before the first frame and no further (memory the loader does not
    use stays untaken), and none once the lane is closed."""
    from shardstream.client._lanes import PREPARE_AHEAD, PREPARE_PIECE

    assert PREPARE_AHEAD == 1
    slots, size = 8, 2 * PREPARE_PIECE + (64 << 10)  # three pieces a slot
    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, slots, size, b)
    try:
        stream = lane.new_stream()
        assert resident_slots(lane, slots, size) == [False] * slots
        a.sendall(FRAME.pack(0, stream, 0, 8) + b"A" * 8)  # slot 0 written: 1 ready
        await asyncio.wait_for(lane.arrival(0, stream), 10)
        assert bytes(lane.take(0, 8, stream)) == b"A" * 8
        await until(lambda: lane._ready == 2, 10, "slot 1 made ready")
        assert resident_slots(lane, slots, size)[1:] == [True] + [False] * 6
        a.sendall(FRAME.pack(2, stream, 1, 8) + b"B" * 8)  # slot 2 written: 3 ready
        await asyncio.wait_for(lane.arrival(2, stream), 10)
        assert bytes(lane.take(2, 8, stream)) == b"B" * 8
        await until(lambda: lane._ready == 4, 10, "slot 3 made ready")
        assert resident_slots(lane, slots, size)[3:] == [True] + [False] * 4
        a.sendall(FRAME.pack(7, stream, 2, 8) + b"C" * 8)  # the last slot: none after
        await asyncio.wait_for(lane.arrival(7, stream), 10)
        assert lane._ready == slots
        assert resident_slots(lane, slots, size)[4:7] == [False] * 3
    finally:
        lane.close()
        a.close()
    assert lane._preparer is not None and not lane._preparer.is_alive() and not lane.mapped


async def test_a_lane_without_threads_leaves_none_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread for the pages (the process at its thread limit): the lane works without
    it. No thread to receive: no lane, and no thread of it left."""
    import threading

    from shardstream.client import _lanes

    refuse: list[str] = []
    start = threading.Thread.start

    def start_or_refuse(thread: threading.Thread) -> None:
        if any(thread.name.endswith(suffix) for suffix in refuse):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(_lanes.threading.Thread, "start", start_or_refuse)
    refuse.append("-pages")
    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 4, 64 << 10, b)
    try:
        assert lane._preparer is None
        stream = lane.new_stream()
        a.sendall(FRAME.pack(0, stream, 0, 4) + b"data")
        await asyncio.wait_for(lane.arrival(0, stream), 10)
        assert bytes(lane.take(0, 4, stream)) == b"data"
    finally:
        lane.close()
        a.close()
    refuse.append("-0000")
    a, b = socket.socketpair()
    try:
        with pytest.raises(RuntimeError):
            NetworkLane("0" * 16, 4, 64 << 10, b)
        assert not [t for t in threading.enumerate() if t.name.startswith("shardstream-lane-0000")]
    finally:
        a.close()
        b.close()


async def test_a_lane_whose_pages_cannot_be_prepared_still_takes_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the kernel refuses to take pages ahead (before Linux 5.14: EINVAL), the
    preparing thread stops and frames land as they would without it."""
    from shardstream.client import _lanes

    calls: list[int] = []

    def refuse(address: int, length: int, advice: int) -> int:
        calls.append(advice)
        return -1

    monkeypatch.setattr(_lanes, "_madvise", refuse)
    a, b = socket.socketpair()
    lane = NetworkLane("0" * 16, 4, 64 << 10, b)
    try:
        assert lane._preparer is not None
        stream = lane.new_stream()
        for place, slot in enumerate((0, 1, 2, 3)):
            a.sendall(FRAME.pack(slot, stream, place, 4) + b"data")
            await asyncio.wait_for(lane.arrival(slot, stream), 10)
            assert bytes(lane.take(slot, 4, stream)) == b"data"
            if place == 0:  # asked for slot 1, refused: the thread is gone
                await asyncio.to_thread(lane._preparer.join, 10)
                assert not lane._preparer.is_alive()
                assert calls == [_lanes._MADV_POPULATE_WRITE]
        assert lane.alive and len(calls) == 1
    finally:
        lane.close()
        a.close()


def sending_lane(slots: int = 4) -> tuple[Any, socket.socket, Any]:
    """A worker's network lane over a socket pair, with its own sending thread; the
    client's end of the connection."""
    from concurrent.futures import ThreadPoolExecutor

    from shardstream.server._lanes import Lane

    a, b = socket.socketpair()
    sender = ThreadPoolExecutor(1, "test-lane-send")
    lane = Lane("0" * 16, slots, 4096, memoryview(b""), a, network=True, sender=sender)
    return lane, b, sender


def received(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while part := sock.recv(1 << 16):
        data += part
    return data


async def test_a_network_lanes_frames_go_back_to_back_in_the_order_queued() -> None:
    """Frames of several reads queued at once go out whole, one after another, in the
    order they were queued, all by the lane's one sending thread."""
    from shardstream.server._lanes import send_bytes

    lane, client, sender = sending_lane()
    try:
        threads: set[str] = set()

        def write(message: bytes) -> Any:
            def send(sock: socket.socket, deadline: float) -> None:
                import threading

                threads.add(threading.current_thread().name)
                send_bytes(message, sock, deadline)

            return send

        reading = asyncio.ensure_future(asyncio.to_thread(received, client))
        sends = []
        for stream in (1, 2, 3):
            slot = lane.acquire(stream)
            assert slot is not None
            message = bytes([stream]) * (100_000 * stream)
            sends.append(lane.send_into(slot, stream, len(message), write(message), 10))
        assert await asyncio.gather(*sends) == [True, True, True]
        lane.close("done")
        data = await reading
        at = 0
        for stream in (1, 2, 3):
            slot, read, place, size = FRAME.unpack_from(data, at)
            assert (read, place, size) == (stream, 0, 100_000 * stream)
            at += FRAME.size
            assert data[at : at + size] == bytes([stream]) * size
            at += size
        assert at == len(data) and len(threads) == 1
    finally:
        lane.close("done")
        client.close()
        sender.shutdown()


async def test_no_frame_follows_one_cut_short() -> None:
    """A frame whose message fails half sent leaves the connection out of step: the lane
    ends (the failure raised to its read), and the frames queued behind it are never
    sent: the client sees the cut frame, then the connection's end."""
    from shardstream.server._lanes import send_bytes

    lane, client, sender = sending_lane()
    try:

        def half_then_fail(sock: socket.socket, deadline: float) -> None:
            send_bytes(b"x" * 500, sock, deadline)
            raise ValueError("the message could not be made")

        def whole(sock: socket.socket, deadline: float) -> None:
            send_bytes(b"y" * 1000, sock, deadline)

        slots = [lane.acquire(s) for s in (1, 2, 3)]
        sends = [
            lane.send_into(slots[0], 1, 1000, half_then_fail, 10),
            lane.send_into(slots[1], 2, 1000, whole, 10),
            lane.send_into(slots[2], 3, 1000, whole, 10),
        ]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        assert isinstance(outcomes[0], ValueError) and outcomes[1:] == [False, False]
        assert not lane.alive
        data = await asyncio.to_thread(received, client)
        assert data == FRAME.pack(slots[0], 1, 0, 1000) + b"x" * 500
    finally:
        lane.close("done")
        client.close()
        sender.shutdown()


async def test_a_sending_thread_that_cannot_start_ends_the_lane(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An executor that queues the drain job, then fails to start a thread for it (as
    `ThreadPoolExecutor` does at the process's thread limit; a busy thread may still run
    the job, at once or later): the lane ends, so that job never sends beside another,
    and nothing follows what it may have sent."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from shardstream.server._lanes import Lane, send_bytes

    class Flaky(ThreadPoolExecutor):
        refused = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            future = super().submit(fn, *args, **kwargs)  # queued (and run, later)
            if not self.refused:
                self.refused += 1
                raise RuntimeError("can't start new thread")
            return future

    caplog.set_level(logging.INFO, logger="shardstream")
    a, client = socket.socketpair()
    sender = Flaky(1, "test-lane-send")
    lane = Lane("0" * 16, 4, 4096, memoryview(b""), a, network=True, sender=sender)
    try:
        frame = functools.partial(send_bytes, b"z" * 100)
        slot = lane.acquire(1)
        assert slot is not None
        assert await lane.send_into(slot, 1, 100, frame, 10) is False
        assert not lane.alive and "no sending thread: can't start new thread" in caplog.text
        slot = lane.acquire(2)
        assert slot is None or await lane.send_into(slot, 2, 100, frame, 10) is False
        sender.shutdown(wait=True)  # the queued job has run
        first = FRAME.pack(0, 1, 0, 100) + b"z" * 100  # (sent, or cut, if it ran at once)
        assert first.startswith(await asyncio.to_thread(received, client))
    finally:
        lane.close("done")
        client.close()
        sender.shutdown()


async def test_lanes_sharing_a_sending_thread_take_turns() -> None:
    """More lanes than sending threads: a lane with many frames queued hands its thread
    back after a few, so another lane's frame goes out then, not after all of them (its
    stall timeout runs from when it queued)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from shardstream.server._lanes import FRAMES_PER_TURN, Lane, send_bytes

    sender = ThreadPoolExecutor(1, "test-lane-send")
    pairs = [socket.socketpair() for _ in range(2)]
    readers = [asyncio.ensure_future(asyncio.to_thread(received, c)) for _, c in pairs]
    lanes = [
        Lane(name * 16, 16, 4096, memoryview(b""), w, network=True, sender=sender)
        for name, (w, _) in zip("ab", pairs, strict=True)
    ]
    order: list[str] = []
    go = threading.Event()

    def frame(name: str) -> Any:
        def send(sock: socket.socket, deadline: float) -> None:
            if not order:
                assert go.wait(10)  # until every frame is queued
            order.append(name)
            send_bytes(b"x" * 10, sock, deadline)

        return send

    try:
        first = [
            asyncio.ensure_future(
                lanes[0].send_into(lanes[0].acquire(s) or 0, s, 10, frame("a"), 10)
            )
            for s in range(1, 11)
        ]
        other = asyncio.ensure_future(
            lanes[1].send_into(lanes[1].acquire(1) or 0, 1, 10, frame("b"), 10)
        )
        await until(  # every frame queued; the thread holds the first, waiting for `go`
            lambda: len(lanes[0]._frames) == 9 and len(lanes[1]._frames) == 1 and bool(order) is False,
            10, "the frames queued",
        )  # fmt: skip
        go.set()
        assert await asyncio.gather(*first, other) == [True] * 11
        assert order.index("b") == FRAMES_PER_TURN
    finally:
        for lane in lanes:
            lane.close("done")
        await asyncio.gather(*readers)
        for _, c in pairs:
            c.close()
        sender.shutdown()
