"""Loader options (`LoaderConfig`) and what a loader reports (`LoaderStatistics`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shardstream.client._planner import PlanOptions, Remainder
from shardstream.client._security import ClientSecurity
from shardstream.client.errors import ConfigError

MiB = 1 << 20


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
    remainder: Remainder = "drop"  # N % world_size records: "drop" or "pad" (wrap around)
    drop_last: bool = False  # drop each rank's last partial batch
    on_error: Literal["raise", "skip"] = "raise"  # records a worker cannot decode: raise, or
    # skip them (their batch is that much shorter; the number of batches never changes)
    read_bytes: int = 8 * MiB  # target size of one read (a slice of a shard)
    max_inflight_reads: int = 8  # read streams running at once, over all workers...
    # ...and on any one worker. A worker decodes one chunk ahead per stream, so this should
    # be at least its --processes; more streams only interleave on its connection and
    # hold more memory (bench, 1 worker: client RSS 124 MB with 2, 185 MB with 8).
    reads_per_worker: int = 4
    # TCP connections to each worker; reads take them in turn. More than one lets the
    # client receive on several connections at once (gRPC's I/O threads work without the
    # GIL), where one connection's stream of messages is the limit.
    connections_per_worker: int = 1
    reads_ahead: int = 16  # reads started but not consumed: bounds memory
    prefetch_batches: int = 4  # batches ready before the consumer asks
    chunk_bytes: int = 4 * MiB  # preferred bytes per streamed message (the worker caps it)
    max_message_bytes: int = 16 * MiB  # gRPC max receive size (>= the workers' messages)
    describe_timeout: float = 30.0  # seconds to wait for workers to describe the dataset
    idle_timeout: float = 30.0  # seconds a read may go without data before resuming elsewhere
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
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")

        if not self.dataset:
            raise ConfigError("dataset must be a non-empty name")
        for name in (
            "batch_size", "world_size", "read_bytes", "max_inflight_reads", "reads_per_worker",
            "connections_per_worker", "reads_ahead",
            "prefetch_batches", "chunk_bytes", "max_message_bytes", "describe_timeout",
            "idle_timeout", "retry_deadline", "backoff_base", "backoff_cap", "keepalive_seconds",
            "resolve_interval", "lag_warning_seconds",
        ):  # fmt: skip
            positive(name)
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.reads_ahead < self.max_inflight_reads:
            raise ConfigError(
                f"reads_ahead ({self.reads_ahead}) must be >= max_inflight_reads "
                f"({self.max_inflight_reads})"
            )
        try:
            self.plan_options()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def plan_options(self) -> PlanOptions:
        return PlanOptions(
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_window=self.shuffle_window,
            remainder=self.remainder,
            drop_last=self.drop_last,
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
    reads_in_flight: dict[str, int]  # reads running now, by worker
    reads_by_worker: dict[str, int]  # read streams started, by worker
    seconds: float  # since the loader started: batches / seconds is the rate

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds if self.seconds else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0
