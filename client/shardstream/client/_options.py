"""Loader options (`LoaderConfig`) and what a loader reports (`LoaderStatistics`)."""

import itertools
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NoReturn, Required, TypedDict

from shardstream.client._fetch import FetchOptions
from shardstream.client._pipeline import WAIT_BUCKETS, PipelineOptions
from shardstream.client._planner import SEED_LIMIT, PlanOptions, Remainder
from shardstream.client._pool import PoolOptions
from shardstream.client._ragged import RaggedMode
from shardstream.client._security import ClientSecurity
from shardstream.client.errors import ConfigError
from shardstream.v1.codec import FieldSpec

MiB = 1 << 20
DEFAULT_READS_AHEAD = 8  # reads_ahead=0: this many (or what max_inflight_reads, shuffle_reads need)
MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC's limit on a message (a C int)
# What a same-host lane's slot holds beyond a whole read's records: the chunk's headers
# (shard id, field names and shapes, 64-byte alignment pads).
LANE_SLOT_MARGIN = 64 * 1024
# Options that count something (positive ints) and durations (positive seconds).
_COUNTS = (
    "batch_size", "world_size", "read_bytes", "max_inflight_reads", "reads_per_worker",
    "connections_per_worker", "reads_ahead", "prefetch_batches", "chunk_bytes",
)  # fmt: skip
_SECONDS = (
    "describe_timeout", "idle_timeout", "retry_deadline", "backoff_base", "backoff_cap",
    "keepalive_seconds", "resolve_interval", "lag_warning_seconds", "straggler_seconds",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderConfig:
    """A rank's loader options. The plan options decide which batches a rank gets;
    the rest only how fast and with how much memory."""

    dataset: str
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0  # base of every shuffle
    shuffle: bool = False  # permute shard order per (seed, epoch)
    shuffle_window: int = 0  # >1: also shuffle records in windows of this many (memory!)
    # >0 (with shuffle): record-level shuffle instead: blocks of one read (read_bytes) of
    # each shard permuted over the whole epoch, records shuffled in groups of this many
    # reads; holds that many reads more in memory. 0: shard order only (as before).
    shuffle_reads: int = 0
    remainder: Remainder = "drop"  # N % world_size records: "drop" or "pad" (wrap around)
    drop_last: bool = False  # drop each rank's last partial batch
    on_error: Literal["raise", "skip"] = "raise"  # records a worker cannot decode: raise, or
    # skip them (their batch is that much shorter; the number of batches never changes)
    # Ragged fields (variable length, strings, bytes) in batches: "pad" to the batch's
    # longest record (+ NAME_lengths; text as list[str] / list[bytes]), or "flat" values
    # + NAME_offsets (batch + 1); see `_ragged`.
    ragged: RaggedMode = "pad"
    pad_to: int | None = None  # "pad": this fixed length instead, longer records truncated
    # Target size of one read (a slice of a shard). Each read is a gRPC call (~0.5 ms of
    # the client's CPU in grpcio alone): larger reads cost less per GB, and on a same-host
    # lane a read is one chunk (bench/README.md).
    read_bytes: int = 16 * MiB
    max_inflight_reads: int = 8  # read streams running at once, over all workers...
    # ...and on any one worker. A worker decodes one chunk ahead per stream, so this should
    # be at least its --processes; more streams only interleave on its connection and
    # hold more memory (bench, 1 worker: client RSS 124 MB with 2, 185 MB with 8).
    reads_per_worker: int = 4
    # TCP connections to each worker; reads take them in turn. More than one lets the
    # client receive on several connections at once (gRPC's I/O threads work without the
    # GIL), where one connection's stream of messages is the limit.
    connections_per_worker: int = 1
    # A worker on this host (a sidecar, spare cores of this node) hands chunks over in
    # shared memory instead of the socket, where it offers a lane (`_lanes`); False: bytes.
    same_host_lane: bool = True
    # A worker on another host sends chunks over a plain TCP connection beside the gRPC
    # one, into this process's memory (one copy fewer on each side, no gRPC framing),
    # where it offers a network lane; never with TLS. False: bytes on the gRPC stream.
    network_lane: bool = True
    # Reads started but not consumed: bounds memory (reads_ahead x read_bytes). 0: 8, or
    # max_inflight_reads, or 2 x shuffle_reads (with shuffle), whichever is largest.
    reads_ahead: int = 0
    prefetch_batches: int = 4  # batches ready before the consumer asks
    chunk_bytes: int = 4 * MiB  # preferred bytes per streamed message (the worker caps it)
    max_message_bytes: int = 16 * MiB  # gRPC max receive size (>= the workers' messages)
    describe_timeout: float = 30.0  # seconds to wait for workers to describe the dataset
    idle_timeout: float = 30.0  # seconds a read may go without data before resuming elsewhere
    # A stream whose next message is `straggler_factor` times later than the fleet's usual
    # gap between messages, and at least `straggler_seconds` late, moves to a worker with
    # room for it (at most `straggler_moves` times per read; 0 turns this off).
    straggler_factor: float = 8.0
    straggler_seconds: float = 2.0
    straggler_moves: int = 2
    retry_deadline: float = 120.0  # seconds without progress before giving up on a read
    backoff_base: float = 0.1  # first backoff after a worker fails, doubling...
    backoff_cap: float = 5.0  # ...up to this many seconds
    keepalive_seconds: float = 10.0  # HTTP/2 ping interval detecting dead connections
    ledger_dir: str | None = None  # write what this rank receives, per epoch (`shardstream audit`)
    security: ClientSecurity | None = None  # TLS / mTLS / bearer token; None: plaintext
    resolve_interval: float = 30.0  # seconds between re-resolutions of dns:/// worker names
    lag_warning_seconds: float = 10.0  # warn (at most this often) while no batch arrives
    channel_options: tuple[tuple[str, int | str], ...] = field(default=())  # extra gRPC options
    # Raise glibc's malloc thresholds for this process on start (see `tune_malloc`): multi-MiB
    # messages then reuse heap memory instead of a fresh mmap (~1000 page faults) each.
    tune_malloc: bool = True

    def __post_init__(self) -> None:
        """Refuse options of the wrong type or out of range (`ConfigError` naming the
        option, its value and what it accepts); numpy numbers become plain ones."""

        def fail(name: str, accepts: str) -> NoReturn:
            raise ConfigError(f"{name} must be {accepts}, got {getattr(self, name)!r}")

        def integer(name: str, lo: int, hi: int | None, kind: str, within: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                fail(name, kind)
            value = int(value)
            object.__setattr__(self, name, value)  # a numpy int too: states are JSON
            if value < lo or (hi is not None and value >= hi):
                fail(name, within)

        def seconds(name: str, most: float | None) -> None:
            value = getattr(self, name)
            accepts = "a positive, finite number of seconds"
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                fail(name, accepts)
            value = float(value)
            if not 0 < value < math.inf or (most is not None and value > most):
                fail(name, accepts if most is None else f"{accepts}, at most {most}")
            object.__setattr__(self, name, value)

        if not isinstance(self.dataset, str) or not self.dataset:
            fail("dataset", "a non-empty name (str)")
        given: object = self.reads_ahead  # not checked yet: any type
        if not isinstance(given, bool) and isinstance(given, numbers.Integral) and given == 0:
            object.__setattr__(self, "reads_ahead", self._auto_reads_ahead())
        for name in _COUNTS:
            integer(name, 1, None, "a positive int", "positive")
        integer("max_message_bytes", 1, MAX_MESSAGE_BYTES + 1, "a positive int",
                f"in [1, {MAX_MESSAGE_BYTES}] (gRPC's limit)")  # fmt: skip
        integer("rank", 0, self.world_size, f"an int in [0, world_size={self.world_size})",
                f"in [0, world_size={self.world_size})")  # fmt: skip
        integer("seed", 0, SEED_LIMIT, "an int in [0, 2**64)", "in [0, 2**64)")
        integer("shuffle_window", 0, None, "an int >= 0", ">= 0")
        integer("shuffle_reads", 0, None, "an int >= 0", ">= 0")
        integer("straggler_moves", 0, None, "an int >= 0", ">= 0")
        seconds("straggler_factor", None)  # a ratio: the same rules as seconds
        if self.straggler_factor < 1:
            fail("straggler_factor", "a number >= 1 (times the fleet's usual gap)")
        for name in _SECONDS:  # finite; gRPC takes some in milliseconds, as a C int
            ms = name in ("keepalive_seconds", "backoff_cap")
            seconds(name, MAX_MESSAGE_BYTES // 1000 if ms else None)
        for name in ("shuffle", "drop_last", "tune_malloc", "same_host_lane", "network_lane"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.remainder not in ("drop", "pad"):
            fail("remainder", "'drop' or 'pad'")
        if self.on_error not in ("raise", "skip"):
            fail("on_error", "'raise' or 'skip'")
        if self.ragged not in ("pad", "flat"):
            fail("ragged", "'pad' or 'flat'")
        if self.pad_to is not None:
            integer("pad_to", 1, None, "None or a positive int", "positive")
            if self.ragged != "pad":
                fail("pad_to", "None with ragged='flat' (it pads; give ragged='pad')")
        if self.ledger_dir is not None and not isinstance(self.ledger_dir, str | os.PathLike):
            fail("ledger_dir", "None or a folder (str or path)")
        if self.ledger_dir is not None:  # before connecting, not at the first epoch
            try:
                os.makedirs(self.ledger_dir, exist_ok=True)
                writable = os.access(self.ledger_dir, os.W_OK | os.X_OK)
            except OSError as exc:
                raise ConfigError(
                    f"ledger_dir {os.fspath(self.ledger_dir)!r} cannot be a folder: "
                    f"{exc.strerror or exc}"
                ) from None
            if not writable:
                raise ConfigError(f"ledger_dir {os.fspath(self.ledger_dir)!r} is not writable")
        if self.security is not None and not isinstance(self.security, ClientSecurity):
            fail("security", "None or a ClientSecurity")
        self._check_channel_options()
        if self.reads_ahead < self.max_inflight_reads:
            raise ConfigError(
                f"reads_ahead ({self.reads_ahead}) must be >= max_inflight_reads "
                f"({self.max_inflight_reads})"
            )
        if self.shuffle and self.reads_ahead < 2 * self.shuffle_reads:
            raise ConfigError(
                f"reads_ahead ({self.reads_ahead}) must be >= 2 x shuffle_reads "
                f"({self.shuffle_reads}), so the next group of reads comes in while one is "
                "delivered; raise reads_ahead or lower shuffle_reads"
            )
        try:
            self.plan_options()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _auto_reads_ahead(self) -> int:
        """`reads_ahead` when given as 0 (the default). Options it depends on that are
        wrong are ignored here and refused next, by name."""
        wanted = DEFAULT_READS_AHEAD
        inflight: object = self.max_inflight_reads  # not checked yet: any type
        block: object = self.shuffle_reads
        if not isinstance(inflight, bool) and isinstance(inflight, numbers.Integral):
            wanted = max(wanted, int(inflight))
        if self.shuffle is True and isinstance(block, numbers.Integral):
            wanted = max(wanted, 2 * int(block))
        return wanted

    def _check_channel_options(self) -> None:
        """`channel_options` as a tuple of (str, int | str) pairs, or ConfigError."""
        given: Any = self.channel_options
        pairs: list[tuple[str, int | str]] = []
        ok = isinstance(given, Sequence) and not isinstance(given, str | bytes)
        for item in given if ok else ():
            if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 2:
                ok = False
                break
            name, value = item
            if not isinstance(name, str) or isinstance(value, bool):
                ok = False
                break
            if not isinstance(value, int | str):
                ok = False
                break
            pairs.append((name, value))
        if not ok:
            raise ConfigError(
                "channel_options must be (name, value) pairs, name a str and value an int or "
                f"a str, e.g. (('grpc.so_reuseport', 0),), got {self.channel_options!r}"
            )
        object.__setattr__(self, "channel_options", tuple(pairs))

    def plan_options(self, record_bytes: int = 0) -> PlanOptions:
        """The options that decide which batches this rank gets; `record_bytes`: the
        dataset's measured record size (`DatasetDesc.record_bytes`), if any."""
        pinned = self.shuffle and self.shuffle_reads
        return PlanOptions(
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_window=self.shuffle_window,
            shuffle_reads=self.shuffle_reads,
            # The read size cuts the blocks of a record-level shuffle: a state pins it then.
            read_bytes=self.read_bytes if pinned else 0,
            record_bytes=record_bytes if pinned else 0,
            remainder=self.remainder,
            drop_last=self.drop_last,
        )

    def plan_dict(self, record_bytes: int = 0) -> dict[str, Any]:
        """`plan_options()` as a plain dict, as saved in states and ledgers."""
        return asdict(self.plan_options(record_bytes))

    def pool_options(self) -> PoolOptions:
        """What the worker pool needs: connections, backoff, start-up, scheduling."""
        return PoolOptions(
            dataset=self.dataset,
            channel_options=tuple(self.grpc_options()),
            backoff_base=self.backoff_base,
            backoff_cap=self.backoff_cap,
            describe_timeout=self.describe_timeout,
            security=self.security,
            resolve_interval=self.resolve_interval,
            reads_per_worker=self.reads_per_worker,
            connections_per_worker=self.connections_per_worker,
            same_host_lane=self.same_host_lane,
            lane_slots=self.lane_slots(),
            lane_slot_bytes=self.read_bytes + LANE_SLOT_MARGIN,
            network_lane=self.network_lane,
            network_lane_slots=self.network_lane_slots(),
            max_message_bytes=self.max_message_bytes,
        )

    def lane_slots(self) -> int:
        """Chunks this loader may hold at once (the reads ahead, the shuffle's reads and
        the prefetched batches, in chunks, and a few in flight): what its same-host lanes
        ask for, since its arrays view their slots."""
        reads = self.reads_ahead + self.shuffle_reads
        chunks = reads * -(-self.read_bytes // self.chunk_bytes) + self.prefetch_batches + 4
        return min(chunks, 1024)

    def network_lane_slots(self) -> int:
        """Whole reads this loader may hold at once, from one worker (the reads ahead,
        the shuffle's reads, the prefetched batches and a few in flight): what its network
        lanes ask for. The slots are this process's memory, taken as frames arrive, so
        they are counted in reads (a lane chunk of stored records is a whole read): a
        chunk that finds none comes on the stream."""
        return min(self.reads_ahead + self.shuffle_reads + self.prefetch_batches + 4, 1024)

    def fetch_options(
        self,
        *,
        max_chunk_records: int,
        schema: tuple[FieldSpec, ...],
        lane_chunk_records: int = 0,
        journal: Callable[[dict[str, object]], None] | None = None,
        epoch: int = 0,
        fingerprint: str = "",
    ) -> FetchOptions:
        """What each read needs: the request's fields, the schema every chunk is checked
        against, timeouts and the error policy."""
        return FetchOptions(
            dataset=self.dataset,
            seed=self.seed,
            max_chunk_records=max_chunk_records,
            lane_chunk_records=lane_chunk_records,
            schema=schema,
            idle_timeout=self.idle_timeout,
            straggler_factor=self.straggler_factor,
            straggler_seconds=self.straggler_seconds,
            straggler_moves=self.straggler_moves,
            retry_deadline=self.retry_deadline,
            on_error=self.on_error,
            journal=journal,
            epoch=epoch,
            fingerprint=fingerprint,
        )

    def pipeline_options(self) -> PipelineOptions:
        """What an epoch's pipeline needs: its bounds."""
        return PipelineOptions(
            max_inflight_reads=self.max_inflight_reads,
            reads_ahead=self.reads_ahead,
            prefetch_batches=self.prefetch_batches,
            lag_warning_seconds=self.lag_warning_seconds,
        )

    def grpc_options(self) -> list[tuple[str, int | str]]:
        ka = int(self.keepalive_seconds * 1000)
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", ka),
            ("grpc.keepalive_timeout_ms", max(1000, ka // 2)),
            ("grpc.http2.ping_timeout_ms", max(1000, ka // 2)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),  # reads are resumed by the client itself
            ("grpc.use_local_subchannel_pool", 1),  # one connection per worker channel
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(self.backoff_cap * 1000)),
            *self.channel_options,
        ]


class LoaderOptions(TypedDict, total=False):
    """`Loader(addresses, **options)`'s keyword arguments, typed for editors and type
    checkers: `LoaderConfig`'s fields (documented there), with `rank` and `world_size`
    optional (None: discovered from Horovod, torch.distributed, JAX or the environment).
    A test keeps the two in step."""

    dataset: Required[str]
    batch_size: Required[int]
    rank: int | None
    world_size: int | None
    seed: int
    shuffle: bool
    shuffle_window: int
    shuffle_reads: int
    remainder: Remainder
    drop_last: bool
    on_error: Literal["raise", "skip"]
    ragged: RaggedMode
    pad_to: int | None
    read_bytes: int
    max_inflight_reads: int
    reads_per_worker: int
    connections_per_worker: int
    same_host_lane: bool
    network_lane: bool
    reads_ahead: int
    prefetch_batches: int
    chunk_bytes: int
    max_message_bytes: int
    describe_timeout: float
    idle_timeout: float
    straggler_factor: float
    straggler_seconds: float
    straggler_moves: int
    retry_deadline: float
    backoff_base: float
    backoff_cap: float
    keepalive_seconds: float
    ledger_dir: str | None
    security: ClientSecurity | None
    resolve_interval: float
    lag_warning_seconds: float
    channel_options: tuple[tuple[str, int | str], ...]
    tune_malloc: bool


@dataclass(frozen=True, slots=True)
class EpochStatistics:
    """One epoch as this rank's consumer saw it (`LoaderStatistics.epochs`)."""

    batches: int
    records: int
    bytes: int
    wait_seconds: float  # time the consumer waited for a batch: input-bound time
    seconds: float  # from the first batch asked for to the last one received
    completed: bool  # iterated to its end

    @property
    def wait_fraction(self) -> float:
        """Share of the epoch spent waiting for data (near 0: input keeps up)."""
        return self.wait_seconds / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class WaitHistogram:
    """How long the consumer waited for each batch it received (`LoaderStatistics.data_wait`):
    `counts[i]` batches waited more than `bounds[i - 1]` and at most `bounds[i]` seconds;
    the last count, one past the bounds, those that waited longer."""

    bounds: tuple[float, ...] = WAIT_BUCKETS  # seconds, increasing
    counts: tuple[int, ...] = (0,) * (len(WAIT_BUCKETS) + 1)
    seconds: float = 0.0  # the waits, all added

    @property
    def count(self) -> int:
        """Batches received."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, batches that waited at most that long), the last bound `inf`: the
        buckets as Prometheus has them."""
        totals = itertools.accumulate(self.counts)
        return list(zip((*self.bounds, math.inf), totals, strict=True))


@dataclass(frozen=True, slots=True)
class LoaderStatistics:
    """What a loader has delivered so far (`Loader.statistics()`)."""

    epochs_completed: int
    batches: int
    records: int
    bytes: int
    wait_seconds: float  # time the consumer spent waiting for a batch
    resumes: int  # reads continued elsewhere after a failure, cut or drain
    resumes_by_worker: dict[str, int]
    max_reorder_depth: int
    records_skipped: int  # bad records left out (on_error="skip")
    stragglers: int  # reads moved off a worker far slower than the fleet
    reads_in_flight: dict[str, int]  # reads running now, by worker
    reads_by_worker: dict[str, int]  # read streams started, by worker
    # Chunk bytes that came through a same-host lane (shared memory), by worker with one.
    lane_bytes_by_worker: dict[str, int]
    seconds: float  # since the loader started: batches / seconds is the rate
    # Per epoch (the last iteration of each): batches, waiting, duration.
    epochs: dict[int, EpochStatistics] = field(default_factory=dict)
    # The wait for each batch received (`wait_seconds` also holds the waits for the ends
    # of epochs): the consumer's data-wait histogram.
    data_wait: WaitHistogram = field(default_factory=WaitHistogram)

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds if self.seconds else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0
