"""One consumer process of one benchmark run (started by bench.run; not for direct use).

    python -m bench.consumer SPEC.json

Imports what its system needs, prints `ready`, waits for a line on stdin, then
consumes (timing every wait for a batch, sleeping `step_ms` per batch), writes
the ids it received to SPEC["ids_out"] (.npy) and its figures to
SPEC["result_out"] (JSON), and exits. Children it starts (ZeroMQ producers,
torch DataLoader workers) are stopped before it exits.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FIELDS, die_with_parent, memmap_shard, thread_cpu, vm_hwm_bytes
from bench.work_decoder import apply_work, work_one


class Meter:
    """Timing of one consumer loop."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.step = spec["step_ms"] / 1000.0
        self.seconds = spec["seconds"]
        self.ids: list[np.ndarray[Any, Any]] = []
        self.batches = self.records = self.nbytes = 0
        self.wait = 0.0
        self.ttfb: float | None = None
        self.complete = True

    def start(self) -> None:
        self.threads0 = thread_cpu(os.getpid())
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.cpu0 = time.process_time()
        self.child0 = _children_cpu()

    def got(self, t_request: float, ids: np.ndarray[Any, Any] | None, nbytes: int, n: int) -> bool:
        """Account one batch; False when the time limit is reached."""
        now = time.perf_counter()
        if self.ttfb is None:
            self.ttfb = now - self.t0
            self.t_first = now
        else:
            self.wait += now - t_request
        if ids is not None:
            self.ids.append(np.array(ids, dtype=np.int64, copy=True))
        self.batches += 1
        self.records += n
        self.nbytes += nbytes
        if now - self.t0 > self.seconds:
            self.complete = False
            return False
        return True

    def finish(self) -> None:
        """The last batch is in (or the limit reached): stop the clocks."""
        self.t_end = time.perf_counter()
        self.cpu_end = time.process_time()
        threads = thread_cpu(os.getpid())
        self.threads = {
            k: round(v - self.threads0.get(k, 0.0), 3)
            for k, v in sorted(threads.items(), key=lambda kv: -kv[1])
            if v - self.threads0.get(k, 0.0) > 0
        }

    def stop(self) -> dict[str, Any]:
        """The figures, once the system is shut down (its children's CPU is known)."""
        t_end = self.t_end
        after_first = t_end - self.t_first if self.ttfb is not None else 0.0
        return {
            "wall_s": t_end - self.t0,
            "t_start": self.wall0,
            "t_end": self.wall0 + (t_end - self.t0),
            "client_cpu_s": self.cpu_end - self.cpu0,
            "children_cpu_s": _children_cpu() - self.child0,
            "client_rss_bytes": vm_hwm_bytes(os.getpid()),
            "client_threads_cpu_s": self.threads,  # by thread name: where the CPU went
            "ttfb_s": self.ttfb,
            "wait_s": self.wait,
            "wait_fraction": self.wait / after_first if after_first > 0 else None,
            "batches": self.batches,
            "records": self.records,
            "bytes": self.nbytes,
            "complete": self.complete,
        }


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _nbytes(batch: dict[str, Any]) -> int:
    total = 0
    for v in batch.values():
        total += v.nbytes if isinstance(v, np.ndarray) else v.element_size() * v.nelement()
    return total


def consume(meter: Meter, batches: Iterator[dict[str, Any]]) -> None:
    """The consumer loop shared by the synchronous systems (the clock runs already)."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        ids = batch["id"]
        if not isinstance(ids, np.ndarray):
            ids = ids.numpy()
        if not meter.got(t, ids, _nbytes(batch), len(ids)):
            break
        if meter.step:
            time.sleep(meter.step)
    meter.finish()


async def aconsume(meter: Meter, batches: AsyncIterator[dict[str, Any]]) -> None:
    """The same loop for the asyncio API; the step awaits (the loop keeps receiving)."""
    it = aiter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = await anext(it)
        except StopAsyncIteration:
            break
        if not meter.got(t, batch["id"], _nbytes(batch), len(batch["id"])):
            break
        if meter.step:
            await asyncio.sleep(meter.step)
    meter.finish()


# systems -------------------------------------------------------------------------------


def run_shardstream(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    opts = dict(
        dataset="bench", batch_size=spec["batch_size"], rank=spec["rank"],
        world_size=spec["world"], **spec.get("loader_opts", {}),
    )  # fmt: skip
    extra: dict[str, Any] = {}
    if spec["api"] == "sync":
        from shardstream.client import SyncLoader

        go_wait()
        meter.start()  # connecting and describing count in the time to first batch
        with SyncLoader(spec["addresses"], **opts) as loader:
            consume(meter, loader.epoch(0))
            extra["resumes"] = loader.statistics().resumes
        return extra

    from shardstream._common import run_async
    from shardstream.client import Loader

    async def main() -> int:
        go_wait()
        meter.start()
        async with Loader(spec["addresses"], **opts) as loader:
            await aconsume(meter, loader.epoch(0))
            extra["resumes"] = loader.statistics().resumes
        return 0

    run_async(main)
    return extra


def plain_batches(paths: list[str], batch_size: int, work: int) -> Iterator[dict[str, Any]]:
    """The floor: np.load each shard, slice it into batches, apply the work."""
    for path in paths:
        with np.load(path) as z:
            arrays = {k: z[k] for k in FIELDS}
        n = len(arrays["id"])
        for start in range(0, n, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in arrays.items()}
            batch["image"] = apply_work(batch["image"], work)
            yield batch


def run_plain(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    go_wait()
    meter.start()
    consume(meter, plain_batches(spec["paths"], spec["batch_size"], spec["work"]))
    return {}


class ShardRecords:
    """torch map-style Dataset over (shard, index): each item is one record read from
    a memory map of its (uncompressed) npz member, plus the work."""

    def __init__(self, paths: list[str], records_per_shard: list[int], work: int) -> None:
        self.paths = paths
        self.starts = np.cumsum([0, *records_per_shard]).tolist()
        self.work = work
        self._maps: dict[int, dict[str, Any]] = {}  # opened lazily in each process

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray[Any, Any]]:
        shard = bisect.bisect_right(self.starts, i) - 1
        arrays = self._maps.get(shard)
        if arrays is None:
            arrays = self._maps[shard] = memmap_shard(Path(self.paths[shard]))
        local = i - self.starts[shard]
        record = {k: np.array(arrays[k][local]) for k in FIELDS}
        if self.work > 0:
            record["image"] = work_one(record["image"], self.work)
        return record


def run_torch(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    import torch.utils.data as tud

    counts = [spec["records_per_shard"]] * len(spec["paths"])
    dataset = ShardRecords(spec["paths"], counts, spec["work"])
    loader = tud.DataLoader(  # default collation: a dict of stacked torch tensors
        dataset,  # type: ignore[arg-type]
        batch_size=spec["batch_size"],
        shuffle=False,
        num_workers=spec["num_workers"],
    )
    go_wait()
    meter.start()
    consume(meter, loader)  # the iterator (and its worker processes) is created inside
    return {}


def run_zmq(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    import multiprocessing
    import pickle

    import zmq

    from bench.producers import DONE, zmq_producer

    procs_n = spec["procs"]
    extra: dict[str, Any] = {"children_rss": {}}
    address = f"ipc://{spec['tmp']}/zmq-{os.getpid()}.sock"
    go_wait()
    meter.start()  # starting the producers counts in the time to first batch
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=zmq_producer,
            args=(
                address,
                spec["paths"][k::procs_n],
                spec["batch_size"],
                spec["work"],
                spec["hwm"],
            ),
            daemon=True,
        )
        for k in range(procs_n)
    ]
    for p in procs:  # forked before this process creates its ZeroMQ context
        p.start()
    zctx = zmq.Context()
    sock = zctx.socket(zmq.PULL)
    sock.set_hwm(spec["hwm"])
    sock.bind(address)

    def batches() -> Iterator[dict[str, Any]]:
        done = 0
        while done < procs_n:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 2 and frames[0].bytes == DONE:
                usage = pickle.loads(frames[1].bytes)
                extra["children_rss"][usage["pid"]] = usage["hwm"]
                done += 1
                continue
            yield pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])

    try:
        consume(meter, batches())
    finally:
        sock.close(linger=0)
        zctx.term()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    return extra


async def _receive(call: Any, meter: Meter, record_bytes: int) -> bool:
    """Count a bare stream's messages into `meter` (its step slept after each) until the
    call ends (True) or the meter's time limit is reached (False; the call is cancelled)."""
    import grpc

    while True:
        t = time.perf_counter()
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return True
        n = len(msg)
        if not meter.got(t, None, n, n // record_bytes):
            call.cancel()
            return False
        if meter.step:
            await asyncio.sleep(meter.step)


def run_grpc_wire(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    import grpc

    from bench.producers import GRPC_METHOD, GRPC_OPTIONS, REQUEST
    from shardstream._common import run_async

    record_bytes = spec["record_bytes"]

    async def main() -> int:
        go_wait()
        meter.start()
        async with grpc.aio.insecure_channel(spec["address"], options=GRPC_OPTIONS) as ch:
            call = ch.unary_stream(GRPC_METHOD)(
                REQUEST.pack(spec["total_bytes"], spec["message_bytes"])
            )
            await _receive(call, meter, record_bytes)
            meter.finish()
        return 0

    run_async(main)
    return {}


def run_grpc_reads(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The gRPC server of the files (`grpc_file`'s), read the way the loader reads a
    worker: a call per read of the loader's read size (whole messages of the chunk size),
    at most `reads_per_worker` calls at once, the next started as one ends; every message
    counted as it arrives, as `grpc_wire` counts them (nothing held, nothing parsed).
    Against `grpc_file` (one call for everything) it is what reading in ranges costs a bare
    gRPC server and client; against `ss_raw`, what the shardstream worker costs over a bare
    server of the same reads."""
    import grpc

    from bench.producers import GRPC_METHOD, GRPC_OPTIONS, RANGE_REQUEST
    from shardstream._common import run_async
    from shardstream.client import LoaderConfig

    record_bytes, size = spec["record_bytes"], spec["message_bytes"]
    defaults = {f.name: f.default for f in fields(LoaderConfig)}
    opts = {**defaults, **spec.get("loader_opts", {})}
    read = max(1, int(opts["read_bytes"]) // size) * size
    total = spec["total_bytes"]

    async def main() -> int:
        go_wait()
        meter.start()
        async with grpc.aio.insecure_channel(spec["address"], options=GRPC_OPTIONS) as ch:
            stream = ch.unary_stream(GRPC_METHOD)
            starts = iter(range(0, total, read))

            async def reader() -> None:  # one of `reads_per_worker`: reads in turn
                for at in starts:
                    call = stream(RANGE_REQUEST.pack(min(read, total - at), size, at))
                    if not await _receive(call, meter, record_bytes):
                        return  # the time limit: every reader stops at its next message

            await asyncio.gather(*(reader() for _ in range(int(opts["reads_per_worker"]))))
            meter.finish()
        return 0

    run_async(main)
    return {}


def run_ss_raw(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The floor under shardstream's TCP path: a bare grpc.aio client of the worker's own
    Read calls, the reads the loader plans for this rank (the same reads and chunk size,
    the same streams at once on each worker, at most `reads_ahead` started and not yet
    consumed, consumed in order: a later read's messages are held until its turn), and
    nothing of the loader beyond: no parsing, checks, batches or hand-over. Its client
    CPU against the loader's is what the loader costs; against the bare stream's, what
    reads of shard ranges cost in gRPC (calls, several streams, messages held)."""
    import grpc

    from shardstream._common import run_async
    from shardstream.client import Loader
    from shardstream.client._wire import WorkerStub, encode_read

    opts = dict(
        dataset="bench", batch_size=spec["batch_size"], rank=spec["rank"],
        world_size=spec["world"], **spec.get("loader_opts", {}), same_host_lane=False,
        network_lane=False,
    )  # fmt: skip
    chunk = spec["message_bytes"] // spec["record_bytes"]
    record_bytes = spec["record_bytes"]

    async def main() -> int:
        go_wait()
        meter.start()  # describing counts, as for the loader
        async with Loader(spec["addresses"], **opts) as loader:
            cfg = loader.config
            plan, shards = loader.plan(0), loader.dataset.shards
            channels = [
                grpc.aio.insecure_channel(a, options=cfg.grpc_options()) for a in spec["addresses"]
            ]
            try:
                stubs = [WorkerStub(c) for c in channels]
                per_worker = [asyncio.Semaphore(cfg.reads_per_worker) for _ in stubs]
                ahead = asyncio.Semaphore(cfg.reads_ahead)
                reads = plan.reads
                queues: list[asyncio.Queue[bytes | Exception | None]] = [
                    asyncio.Queue() for _ in reads
                ]

                async def one(i: int) -> None:
                    read = reads[i]
                    shard = shards[read.shard]
                    w = i % len(stubs)
                    try:
                        async with per_worker[w]:
                            call = stubs[w].read(encode_read(
                                dataset="bench", shard=shard.id, start=read.start,
                                count=read.count, seed=cfg.seed, fingerprint=shard.fingerprint,
                                max_chunk_records=chunk,
                            ))  # fmt: skip
                            while (msg := await call.read()) is not grpc.aio.EOF:
                                queues[i].put_nowait(msg)
                    except Exception as exc:  # a failed call: the consumer raises it
                        queues[i].put_nowait(exc)
                        return
                    queues[i].put_nowait(None)

                async def start_all() -> None:
                    for i in range(len(reads)):
                        await ahead.acquire()  # released as read i is consumed
                        tasks.append(asyncio.ensure_future(one(i)))

                tasks: list[asyncio.Future[None]] = []
                starter = asyncio.ensure_future(start_all())
                try:
                    for read, q in zip(reads, queues, strict=True):
                        t = time.perf_counter()
                        while (msg := await q.get()) is not None:
                            if isinstance(msg, Exception):
                                raise msg
                            if meter.step and len(msg) >= record_bytes:  # a chunk
                                await asyncio.sleep(meter.step)
                        # a read's records count once it is in: exact bytes, no parsing
                        if not meter.got(t, None, read.count * record_bytes, read.count):
                            break
                        ahead.release()
                finally:
                    for task in [starter, *tasks]:
                        task.cancel()
                    await asyncio.gather(starter, *tasks, return_exceptions=True)
            finally:
                for c in channels:
                    await c.close()
        meter.finish()
        return 0

    run_async(main)
    return {}


def run_tcp_wire(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    from bench.producers import REQUEST

    host, port = spec["address"].rsplit(":", 1)
    size = spec["message_bytes"]
    buf = bytearray(size)
    view = memoryview(buf)
    record_bytes = spec["record_bytes"]
    go_wait()
    meter.start()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(REQUEST.pack(spec["total_bytes"], size))
        while True:  # one "message" = `size` bytes, received into one preallocated buffer
            t = time.perf_counter()
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if not n:
                    break
                got += n
            if not got:
                break
            if not meter.got(t, None, got, got // record_bytes):
                break
            if meter.step:
                time.sleep(meter.step)
        meter.finish()
    return {}


SYSTEMS = {
    "shardstream": run_shardstream,
    "plain": run_plain,
    "torch": run_torch,
    "zmq": run_zmq,
    "grpc_wire": run_grpc_wire,
    "grpc_file": run_grpc_wire,  # the same bare receiver; the server sends file bytes
    "grpc_reads": run_grpc_reads,
    "ss_raw": run_ss_raw,
    "tcp_wire": run_tcp_wire,
}


def go_wait() -> None:
    print("ready", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("no go signal (the benchmark runner went away)")


def main() -> None:
    die_with_parent()
    spec = json.loads(Path(sys.argv[1]).read_text())
    meter = Meter(spec)
    profile = os.environ.get("SHARDSTREAM_BENCH_PROFILE")  # a path prefix: cProfile output
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        extra = profiler.runcall(SYSTEMS[spec["system"]], spec, meter)
        profiler.dump_stats(f"{profile}-{spec['system']}-r{spec.get('rank', 0)}.prof")
    else:
        extra = SYSTEMS[spec["system"]](spec, meter)
    result = {**meter.stop(), **extra}
    ids = np.concatenate(meter.ids) if meter.ids else np.zeros(0, dtype=np.int64)
    np.save(spec["ids_out"], ids)
    Path(spec["result_out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
