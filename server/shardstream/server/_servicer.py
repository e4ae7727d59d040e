"""The Worker service: thin handlers over the catalog and the chunk streamer.

Handlers take a request's bytes, decode and check them (`_wire`, `_requests`),
and return domain objects or serialized chunks (`_streaming`); `_wire` encodes
replies. Refusals are `errors.RequestError`s, which become gRPC status codes in
one place, `_status`.

`serve_read`, the Read handler, writes a read's messages, watching each write
for `stream_stall_timeout`: a client that reads nothing for that long
(its HTTP/2 window stays full) has its stream ended with `StalledError`, so it
keeps neither a `max_streams` slot nor decoded chunks; the status reaches it
after the chunk gRPC still holds for it, if it ever reads, and it resumes the
read. Until its client reads or leaves, such a stream still holds that chunk,
so stalled streams count too: at most `max_streams` run, and running plus
stalled ones stay under `2 * max_streams`. Stalled streams are counted per
client host too (the peer's address without its port): a host holding its share
of them (`max_streams // 4`, at least 1) gets no new stream while running plus
stalled ones are `max_streams` or more, until it reads or leaves them: clients
that open streams and never read, from however many connections, cannot keep
other hosts out of the `max_streams` running streams. gRPC gives a handler no
way to reset its own stream, so what ends a stalled stream whose client never
reads is its connection's age (`--max-connection-age`, then
`--stream-stall-timeout` more: `_worker`). A second after the last stream is
gone, or after streams stalled, freed heap is handed back to the kernel
(`_writes.TrimWhenIdle`), so a worker returns near its baseline memory.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from concurrent.futures import Executor

import grpc

from shardstream.server._catalog import Catalog, Dataset
from shardstream.server._config import WorkerConfig
from shardstream.server._lanes import LaneOffer, Lanes
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._requests import check_read, find_dataset, ready
from shardstream.server._shm import ChunkBuffers
from shardstream.server._status import STATUS, FinishOnError, LogLimit, StatusOnError, shown
from shardstream.server._streaming import ChunkStreamer
from shardstream.server._wire import (
    ReadArgs,
    decode_describe,
    decode_list,
    decode_open_lane,
    decode_read,
)
from shardstream.server._writes import StallWatch, TrimWhenIdle
from shardstream.server.errors import (
    BusyError,
    DrainingError,
    NoLaneError,
    ShardIOError,
    StalledError,
)

TRIM_AFTER_IDLE = 1.0  # seconds without streams before freed heap is handed back
# Where refusals already counted go to get their status: counted again by no one.
_COUNTED = WorkerMetrics()


def peer_host(peer: str) -> str:
    """The client host of a gRPC peer: "ipv4:10.0.0.7:5123" -> "10.0.0.7",
    "ipv6:[::1]:5123" (or %5B::1%5D) -> "::1", an IPv4-mapped IPv6 address as the IPv4
    one; other peers (Unix sockets) as they are."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    text = urllib.parse.unquote(rest)
    host, sep, port = text.rpartition(":")
    host = (host if sep and port.isdigit() else text).strip("[]").lower()
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


def stalled_share(max_streams: int) -> int:
    """Stalled streams one client host may hold before its new reads are refused."""
    return max(1, max_streams // 4)


class WorkerServicer:
    def __init__(
        self,
        config: WorkerConfig,
        executor: Executor,
        metrics: WorkerMetrics | None = None,
        buffers: ChunkBuffers | None = None,
        lanes: Lanes | None = None,
        network_lanes: Lanes | None = None,
    ) -> None:
        self._config = config
        self.metrics = metrics or WorkerMetrics()
        self.lanes = lanes  # same-host lanes (`_lanes`); None: off
        self.network_lanes = network_lanes  # network lanes; None: off (or TLS)
        self._streamer = ChunkStreamer(
            config,
            executor,
            self.metrics,
            buffers,
            draining=self.is_draining,
            lanes=lanes,
            network_lanes=network_lanes,
        )
        self.catalog: Catalog | None = None  # set by the Worker once indexing is done
        self.draining = False  # set by the Worker's drain: refuse streams, end running ones
        self.active = 0  # streams running now
        self.stalled = 0  # streams ended for a client reading nothing, not yet left by it
        self.stalled_by: dict[str, int] = {}  # the same, per client host (`peer_host`)
        self.idle = asyncio.Event()  # set while no stream runs
        self.idle.set()
        self._trim = TrimWhenIdle(TRIM_AFTER_IDLE, lambda: bool(self.active or self.stalled))
        self.refusals = LogLimit(logging.getLogger("shardstream.worker"))  # this worker's

    def is_draining(self) -> bool:
        return self.draining

    def close(self) -> None:
        """Cancel the pending heap trim (the Worker calls this once its server stopped)."""
        self._trim.close()

    async def describe(self, request: bytes, context: grpc.aio.ServicerContext) -> Dataset:
        async with StatusOnError(context, self.metrics, self.refusals):
            return find_dataset(self.catalog, decode_describe(request))

    async def list_datasets(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> list[Dataset]:
        async with StatusOnError(context, self.metrics, self.refusals):
            decode_list(request)
            return list(ready(self.catalog).datasets.values())

    async def open_lane(self, request: bytes, context: grpc.aio.ServicerContext) -> LaneOffer:
        """A ticket for a same-host or network lane (`_lanes`), or NoLaneError."""
        async with StatusOnError(context, self.metrics, self.refusals):
            slots, slot_bytes, network = decode_open_lane(request)
            lanes = self.network_lanes if network else self.lanes
            offer = None if lanes is None or self.draining else lanes.offer(slots, slot_bytes)
            if offer is None:
                kind = "network" if network else "same-host"
                off = "--network-lanes off, or TLS" if network else "--lanes off"
                why = f"turned off ({off})" if lanes is None else "all taken"
                if self.draining:
                    why = "it is draining"
                raise NoLaneError(f"this worker has no {kind} lane to give: {why}")
            return offer

    async def serve_read(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """The Read handler: a read's chunks, then its End, each write watched for a stall
        (`StallWatch`); a refusal or failure sets the call's status. One coroutine per
        stream: the chunks come from the streamer's generator, closed when the stream
        stops early (that cancels the chunk decoding ahead). A stall is counted as an
        error (UNAVAILABLE) when it happens: its client may leave before it is raised."""
        stalled = False
        async with FinishOnError(context, self.metrics, self.refusals):
            args = decode_read(request)
            if self.draining:
                raise DrainingError("the worker is draining")
            host = peer_host(context.peer())
            self._admit(host)
            ds, shard = check_read(self.catalog, args)
            self.active += 1
            self._trim.stream_started()
            self.idle.clear()
            self.metrics.stream(ds.name, +1)
            chunks = self._streamer.stream(ds, shard, args)
            running = True
            closing: asyncio.Task[None] | None = None

            def stop_running() -> None:
                """The stream holds no slot nor chunk any more (once)."""
                nonlocal running
                if running:
                    running = False
                    self.active -= 1
                    self.metrics.stream(ds.name, -1)
                    if self.active == 0:
                        self.idle.set()
                    self._maybe_idle()

            def on_stall() -> None:
                """A write waits on a client that reads nothing: end the stream's work now;
                the write gRPC holds stays until the client reads it or leaves."""
                nonlocal closing
                closing = asyncio.ensure_future(chunks.aclose())
                stop_running()
                self.stalled += 1
                self.stalled_by[host] = self.stalled_by.get(host, 0) + 1
                self.metrics.stalled(+1)
                self.metrics.error(STATUS[StalledError].name)
                self._log_stall(args)
                self._maybe_idle(stalled=True)

            watch = StallWatch(self._config.stream_stall_timeout, on_stall)
            try:
                # Headers first and alone, so that a status after a stall carries none.
                await watch.write(context.send_initial_metadata(()))
                if not watch.stalled():
                    async for message in chunks:
                        await watch.write(context.write(message))
                        if watch.stalled():
                            break
            except OSError as exc:  # reading the shard: the read goes on elsewhere
                why = exc.strerror or str(exc) or type(exc).__name__
                raise ShardIOError(
                    f"cannot read shard {args.shard!r} of dataset {args.dataset!r}: {why}; "
                    "resume the read (elsewhere, or here later)",
                    dataset=args.dataset,
                    shard=args.shard,
                ) from None
            finally:
                watch.close()
                await (chunks.aclose() if closing is None else closing)
                stop_running()
                if watch.stalled():
                    self.stalled -= 1
                    held = self.stalled_by.pop(host) - 1
                    if held:
                        self.stalled_by[host] = held
                    self.metrics.stalled(-1)
                    self._maybe_idle()
            stalled = watch.stalled()
        if stalled:  # its client read at last: it gets the status (counted at the stall)
            async with FinishOnError(context, _COUNTED, self.refusals):
                timeout = self._config.stream_stall_timeout
                raise StalledError(
                    f"ended the stream of shard {args.shard!r} of dataset {args.dataset!r}: "
                    f"the client read nothing for {timeout:g}s (--stream-stall-timeout); "
                    "resume it elsewhere",
                    dataset=args.dataset,
                    shard=args.shard,
                )

    def _admit(self, host: str) -> None:
        limit = self._config.max_streams
        share, mine = stalled_share(limit), self.stalled_by.get(host, 0)
        # Over its share, a host gets no new stream once the worker is half full: its
        # stalled ones stay under about `limit`, and other hosts keep `limit` running.
        if mine >= share and self.active + self.stalled >= limit:
            self.refusals.log(
                logging.WARNING,
                "stalled share",
                "refused reads from %s: it holds %d streams it reads nothing of (its share: %d)",
                shown(host),
                mine,
                share,
            )
            raise BusyError(
                f"clients on {shown(host)} hold {mine} streams they read nothing of, their "
                f"share of this worker (--max-streams {limit}): read them, or retry later"
            )
        if self.active >= limit or self.active + self.stalled >= 2 * limit:
            held = f" and holds {self.stalled} stalled ones" if self.stalled else ""
            raise BusyError(
                f"the worker already serves {self.active} streams{held} (--max-streams {limit})"
            )

    def _log_stall(self, args: ReadArgs) -> None:
        self.refusals.log(
            logging.INFO,
            "stalled",
            "ended a stream of shard %s of dataset %s: its client read nothing for %gs",
            shown(repr(args.shard)),
            shown(repr(args.dataset)),
            self._config.stream_stall_timeout,
        )

    def _maybe_idle(self, *, stalled: bool = False) -> None:
        self._trim.update(stalled=stalled)
