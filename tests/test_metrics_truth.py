"""The worker's Prometheus metrics say what happened: chunk seconds are the decoding
jobs' own time (not a slow client's), records and bytes sent count every chunk handed to
gRPC (a stalled stream's last one too) as the records' data bytes on the socket and
through a lane alike, a stall is a stream error when it happens (its client may leave
without reading), and the utilization window holds whatever the scrape rate."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc
import pytest

from shardstream.client import Loader
from shardstream.server import Worker, make_dataset
from shardstream.server._metrics import UTILIZATION_RESOLUTION, _DecodingCollector
from shardstream.server._wire import ReadArgs
from shardstream.v1 import shardstream_pb2 as pb

from conftest import collect_epoch, until, worker_config

pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")

READ = "/shardstream.v1.Worker/Read"
BIG = 1_000  # records of 64 x 64 x 3 bytes: 12 MB, more than gRPC buffers for a client
BIG_SHAPE = (64, 64, 3)
BIG_RECORD = 64 * 64 * 3 + 2 * 8  # bytes: image uint8, id and label int64
PER_CHUNK = 20  # records per chunk the client asks for (245 KB)
BIG_CHUNK_BYTES = 1 << 20  # the worker's chunk_bytes for them: the client's cap decides


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    make_dataset(root, shards=1, records=BIG, shape=BIG_SHAPE, format="npz")
    return root


async def scrape(worker: Worker) -> dict[str, float]:
    """The worker's metrics: {'name{labels}': value}."""
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def read_call(
    channel: grpc.aio.Channel, shard: str, count: int, max_chunk_records: int = PER_CHUNK
) -> grpc.aio.UnaryStreamCall:
    """A raw Read of records [0, count) of `shard` of "train"."""
    request = pb.ReadRequest(
        dataset="train", shard=shard, start=0, count=count, max_chunk_records=max_chunk_records
    )
    return channel.unary_stream(READ)(request.SerializeToString())


def data_bytes(chunk: pb.Chunk) -> int:
    """Bytes of records' data in a chunk: tensor data and ragged fields' lengths."""
    return sum(len(t.data) + 8 * len(t.lengths) for t in chunk.tensors)


def channel_to(worker: Worker) -> grpc.aio.Channel:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    return grpc.aio.insecure_channel(worker.address, options=options)


# -- chunk seconds -------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "process"])
async def test_chunk_seconds_are_the_jobs_not_a_slow_clients(
    big_root: Path, processes: int
) -> None:
    """A client that pauses after its first chunk: the chunk decoded ahead meanwhile was
    done in milliseconds, and that is what the histogram says (before: the pause, as the
    job was timed when the stream came back from the client to take its result)."""
    pause = 1.5  # the client's own behaviour under test: it reads nothing this long
    async with (
        Worker(
            worker_config(
                big_root,
                metrics_port=0,
                lanes=False,
                chunk_bytes=BIG_CHUNK_BYTES,
                processes=processes,
                direct_reads=False,  # every chunk a job: none read on the event loop
            )
        ) as w,
        channel_to(w) as channel,
    ):
        call = read_call(channel, "shard-00000.npz", BIG)
        messages = [await call.read()]
        await asyncio.sleep(pause)
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
        assert await call.code() == grpc.StatusCode.OK
        m = await scrape(w)
    chunks = BIG // PER_CHUNK
    assert len(messages) == chunks + 1  # and the End
    label = '{dataset="train"}'
    assert m[f"shardstream_chunk_seconds_count{label}"] == chunks
    # Every job well under the pause: none waited on the client.
    assert m['shardstream_chunk_seconds_bucket{dataset="train",le="0.5"}'] == chunks, m
    assert 0 < m[f"shardstream_chunk_seconds_sum{label}"] < pause / 2


def write_ragged(root: Path, records: int) -> None:
    """jsonl records whose tokens take 8 bytes each decoded, ~3 as text: a job sized from
    the file's bytes per record cuts several chunks."""
    lines = [json.dumps({"id": i, "tokens": [i % 7] * (50 + i % 50)}) for i in range(records)]
    (root / "part-0.jsonl").write_text("\n".join(lines) + "\n")


async def test_a_ragged_job_is_timed_once_and_its_bytes_are_its_data(tmp_path: Path) -> None:
    """A dataset with ragged fields: one decoding job cuts several chunks. The histogram
    has one observation a job (before: the job's time, then a 0.0 for each further chunk
    cut from it); bytes sent are the chunks' data bytes (values and lengths)."""
    records = 600
    write_ragged(tmp_path, records)
    config = worker_config(
        tmp_path, ("train=*.jsonl",), metrics_port=0, chunk_bytes=16 * 1024, lanes=False
    )
    async with Worker(config) as w, channel_to(w) as channel:
        call = read_call(channel, "part-0.jsonl", records, max_chunk_records=0)
        messages = [pb.ReadResponse.FromString(m) async for m in call]
        servicer, catalog = w._servicer, w._servicer.catalog if w._servicer else None
        assert servicer is not None and catalog is not None
        ds = catalog.datasets["train"]
        args = ReadArgs(dataset="train", shard="part-0.jsonl", start=0, count=records)
        per_job = servicer._streamer.chunk_records(ds, args, ds.by_id["part-0.jsonl"])
        m = await scrape(w)
    chunks = [r.chunk for r in messages if r.HasField("chunk")]
    jobs = -(-records // per_job)
    assert len(chunks) >= 2 * jobs, (len(chunks), jobs)  # several chunks a job
    assert sum(c.count for c in chunks) == records
    label = '{dataset="train"}'
    assert m[f"shardstream_chunk_seconds_count{label}"] == jobs
    assert m[f"shardstream_records_sent_total{label}"] == records
    assert m[f"shardstream_bytes_sent_total{label}"] == sum(map(data_bytes, chunks))


# -- stalled streams -----------------------------------------------------------------------------


async def test_a_stalled_stream_counts_what_it_handed_over_and_its_stall_once(
    big_root: Path,
) -> None:
    """Two clients stop reading after one chunk; their streams stall. The first then reads
    all it can: it gets as many records and data bytes as the worker counts (before: the
    chunk gRPC held at the stall was not counted), and its UNAVAILABLE status. The second
    leaves without reading: its stall is a stream error too (before: only a status that
    reached its client was), and neither is counted twice."""
    config = worker_config(
        big_root,
        metrics_port=0,
        lanes=False,
        chunk_bytes=BIG_CHUNK_BYTES,
        stream_stall_timeout=1.0,
    )
    async with Worker(config) as w, channel_to(w) as reader:
        servicer = w._servicer
        assert servicer is not None
        call = read_call(reader, "shard-00000.npz", BIG)
        got = [pb.ReadResponse.FromString(await call.read())]
        await until(lambda: servicer.stalled == 1, 30, "the stream stalled")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while (message := await call.read()) is not grpc.aio.EOF:
                got.append(pb.ReadResponse.FromString(message))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await until(lambda: servicer.stalled == 0, 30, "the stalled stream gone")
        chunks = [r.chunk for r in got]
        m = await scrape(w)
        label = '{dataset="train"}'
        assert sum(c.count for c in chunks) < BIG
        assert m[f"shardstream_records_sent_total{label}"] == sum(c.count for c in chunks)
        assert m[f"shardstream_bytes_sent_total{label}"] == sum(map(data_bytes, chunks))
        assert sum(map(data_bytes, chunks)) == sum(c.count for c in chunks) * BIG_RECORD
        assert m['shardstream_stream_errors_total{code="UNAVAILABLE"}'] == 1

        async with channel_to(w) as leaver:
            call = read_call(leaver, "shard-00000.npz", BIG)
            await call.read()
            await until(lambda: servicer.stalled == 1, 30, "the second stream stalled")
            call.cancel()
        await until(lambda: servicer.stalled == 0 and servicer.active == 0, 30, "it left")
        m = await scrape(w)
    assert m['shardstream_stream_errors_total{code="UNAVAILABLE"}'] == 2


# -- bytes sent: socket and lane -----------------------------------------------------------------


async def test_bytes_sent_are_the_records_data_on_the_socket_and_in_a_lane(
    npz_root: Path,
) -> None:
    """The same epoch through a same-host lane (a few large chunks in shared memory) and on
    the socket (many small messages): bytes sent are the records' data bytes both ways,
    what the loader's batches hold (before: whole messages on the socket, with each
    chunk's header and padding; the lane's chunk in its slot)."""
    async with Worker(worker_config(npz_root, processes=1, metrics_port=0)) as w:
        label = '{dataset="train"}'
        sent = []
        for lane in (True, False):
            async with Loader(
                [w.address], dataset="train", batch_size=100, same_host_lane=lane, network_lane=lane
            ) as loader:
                batches = await collect_epoch(loader, 0)
                stats = loader.statistics()
                assert bool(stats.lane_bytes_by_worker) == lane
            m = await scrape(w)
            sent.append(m[f"shardstream_bytes_sent_total{label}"])
            assert sum(v.nbytes for b in batches for v in b.values()) == stats.bytes
    lane_bytes, socket_bytes = sent[0], sent[1] - sent[0]
    assert lane_bytes == socket_bytes == stats.bytes


async def test_lanes_open_opened_and_their_chunks_per_kind(npz_root: Path) -> None:
    """`shardstream_lanes_open`, `_lanes_opened` and `_lane_chunks`, per kind: a loader
    with a same-host lane, then one from "another host" (a network lane), then one with
    no lane: each lane counted open while its loader runs, the chunks it carried (the
    gRPC stream's are not), and nothing open once the loaders are gone."""
    kinds = {"same-host": {"same_host_lane": True}, "network": {"same_host_lane": False}}
    runs = [*kinds.items(), ("none", {"same_host_lane": False, "network_lane": False})]

    def value(m: dict[str, float], name: str, kind: str) -> float:
        return m[f'shardstream_{name}{{kind="{kind}"}}']

    async with Worker(worker_config(npz_root, processes=1, metrics_port=0)) as w:
        assert w._lanes is not None and w._network_lanes is not None
        lanes = (w._lanes, w._network_lanes)
        before = {k: 0.0 for k in kinds}
        for kind, options in runs:
            async with Loader([w.address], dataset="train", batch_size=100, **options) as loader:
                await collect_epoch(loader, 0)
                m = await scrape(w)
                for k in kinds:
                    assert value(m, "lanes_open", k) == (k == kind), (kind, m)
            after = await scrape(w)
            for k in kinds:
                chunks = value(after, "lane_chunks_total", k)
                assert (chunks > before[k]) == (k == kind), (kind, k, chunks)
                before[k] = chunks
            await until(
                lambda: sum(lane.open_lanes() for lane in lanes) == 0,
                10, "the loader's lane closed on the worker",
            )  # fmt: skip
        m = await scrape(w)
        for k in kinds:
            assert value(m, "lanes_open", k) == 0
            assert value(m, "lanes_opened_total", k) == 1
        assert before == {
            "same-host": w._lanes.chunks_sent(),
            "network": w._network_lanes.chunks_sent(),
        }


# -- utilization window --------------------------------------------------------------------------


class FakePool:
    """One decoding process, busy for the first 3 s of the fake clock, idle after."""

    processes = 1

    def __init__(self, clock: list[float]) -> None:
        self._clock = clock

    def busy_seconds(self) -> float:
        return min(3.0, self._clock[0])


def test_utilization_covers_its_window_however_fast_the_scrapes() -> None:
    """A client scraping every millisecond for 8 s (fake time): utilization still covers
    the 8 s, 3/8 busy, and the readings kept stay few (before: the last 1024 readings, a
    second of them, said 0 for a process busy 5 s before)."""
    clock = [0.0]
    collector = _DecodingCollector(FakePool(clock), window=10.0, clock=lambda: clock[0])  # type: ignore[arg-type]
    readings = 0
    while clock[0] < 8.0:
        clock[0] += 0.001
        collector.utilization()
        readings = max(readings, collector.readings())
    assert collector.utilization() == pytest.approx(3 / 8, rel=1e-3)
    assert readings <= 10.0 / UTILIZATION_RESOLUTION + 2
    while clock[0] < 20.0:  # on past the window: the readings older than it go
        clock[0] += 0.001
        collector.utilization()
        readings = max(readings, collector.readings())
    assert collector.utilization() == 0.0  # the last 10 s or more: all idle
    assert readings <= 10.0 / UTILIZATION_RESOLUTION + 2
    clock[0] += 0.05  # a scrape within the resolution: measured to now all the same
    assert collector.utilization() == 0.0
