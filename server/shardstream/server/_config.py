"""Worker configuration: frozen, validated; argv and env are parsed in `cli`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shardstream._common.args import MIN_TIMEOUT  # timeouts are whole milliseconds
from shardstream._common.hosts import url_host
from shardstream.server._security import ServerSecurity
from shardstream.v1.codec import FieldSpec

MiB = 1 << 20
GiB = 1 << 30
# gRPC takes message sizes as C ints: more is an OverflowError when the server starts.
MAX_MESSAGE_BYTES = 2**31 - 1

__all__ = ["DatasetSpec", "TransformSpec", "WorkerConfig"]

_RESERVED_PARAMS = ("record", "rng")  # what every transform gets besides its parameters


@dataclass(frozen=True, kw_only=True, slots=True)
class TransformSpec:
    """One step of a dataset's pipeline: a callable named by import path, and its
    parameters; called per record as `fn(record, rng, **params)` (see `_pipelines`)."""

    fn: str  # "module:function", e.g. "shardstream.server.transforms:horizontal_flip"
    # Keyword arguments (TOML values: numbers, strings, booleans, lists, tables); they
    # are part of the dataset's fingerprint. Not hashed: lists are not hashable.
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        module, colon, name = self.fn.partition(":")
        if not (module and colon and name) or any(c.isspace() for c in self.fn):
            raise ValueError(
                f'a transform is named "module:function", e.g. '
                f'"shardstream.server.transforms:horizontal_flip", got {self.fn!r}'
            )
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise ValueError(f"transform {self.fn}: parameters must map names to values")
        taken = sorted(set(self.params) & set(_RESERVED_PARAMS))
        if taken:
            raise ValueError(
                f"transform {self.fn}: parameter(s) {taken} are taken (every transform is "
                "called as fn(record, rng, **params))"
            )
        object.__setattr__(self, "params", dict(self.params))  # our own, picklable copy

    def describe(self) -> dict[str, Any]:
        """The step as one JSON-able table: {"fn": ..., **params}."""
        return {"fn": self.fn, **self.params}


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetSpec:
    """A dataset a worker serves: a name, a glob under the data root, a format."""

    name: str
    pattern: str  # glob relative to the data root, e.g. "train/*.npz"
    format: str | None = None  # None: inferred from each file's suffix
    # Where content digests are cached across restarts (see `_fingerprint`); None: no
    # cache. WorkerConfig sets it from its `cache_dir` (the catalog reads it here).
    cache_dir: Path | None = None
    # A manifest (`shardstream index`) the shards must match, or start-up refuses;
    # None: none. WorkerConfig sets it from its `manifest`.
    manifest: Path | None = None
    # Run per record after the decoder, in order, in the decoding processes: the
    # dataset's records are what the last one returns (`_pipelines`); (): none.
    transforms: tuple[TransformSpec, ...] = ()
    # The records' fields as declared ([datasets.NAME.schema] in a --config file): start-up
    # refuses unless the decoder (or the transforms) give them, and reads check every
    # record against them (`_catalog`); None: found at start-up.
    schema: tuple[FieldSpec, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(self.transforms))
        if not all(isinstance(t, TransformSpec) for t in self.transforms):
            raise ValueError(f"dataset {self.name!r}: transforms must be TransformSpec objects")
        if not self.name or any(c in self.name for c in "=:/\0"):
            raise ValueError(f"dataset name must be non-empty without '=:/', got {self.name!r}")
        if not self.pattern:
            raise ValueError(f"dataset {self.name!r}: the glob must be non-empty")
        if self.pattern.startswith("/") or ".." in Path(self.pattern).parts:
            raise ValueError(
                f"dataset {self.name!r}: the glob {self.pattern!r} must stay inside the data root "
                "(relative, no '..')"
            )

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """Parse `NAME=GLOB` or `NAME=GLOB:FORMAT` (the worker's --dataset flag)."""
        name, sep, rest = text.partition("=")
        if not sep:
            raise ValueError(f"--dataset must look like NAME=GLOB[:FORMAT], got {text!r}")
        pattern, colon, fmt = rest.rpartition(":")
        if not colon:
            pattern, fmt = rest, ""
        return cls(name=name.strip(), pattern=pattern, format=fmt or None)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig:
    """Everything a worker needs; every default is meant for production use."""

    data_root: Path | str  # a directory, or an fsspec URL ("memory://...", "s3://bucket/...")
    datasets: tuple[DatasetSpec, ...]
    host: str = "127.0.0.1"  # use 0.0.0.0 / [::] to serve other machines
    port: int = 50051  # 0 picks a free port
    processes: int = 1  # decoding processes (spawned); 0 decodes in threads of this process
    # Chunks that are file bytes as they are (npz members stored little-endian, no
    # transform) are read into their messages by this process's I/O threads, skipping the
    # decoding processes (`_direct`); False: every chunk goes through a decoding process.
    direct_reads: bool = True
    # Same-host lanes (`_lanes`): a client on this host gets chunks through shared memory,
    # at most `lane_slots` slots (a loader asks for as many chunks as it may hold) of at
    # least max_message_bytes (a loader asks for a whole read's worth), at most lane_slots
    # x max_message_bytes bytes in one lane, at most `max_lanes` clients at once: at most
    # lane_slots x max_message_bytes x max_lanes bytes, taken as chunks are written.
    lanes: bool = True
    lane_slots: int = 64
    max_lanes: int = 16
    # Network lanes (`_lanes`): a client on another host gets chunks over a plain TCP
    # connection beside its gRPC one, into slots of its own memory (at most lane_slots of
    # them, max_lanes clients at once, as above). Never with TLS: that connection is not
    # encrypted. The port: 0 picks a free one (told to clients in OpenLane).
    network_lanes: bool = True
    network_lane_port: int = 0
    max_message_bytes: int = 8 * MiB  # gRPC max send/receive message size
    chunk_bytes: int = 4 * MiB  # target size of one streamed chunk (<= max message / 2)
    max_streams: int = 64  # concurrent Read streams; more get RESOURCE_EXHAUSTED
    grace_seconds: float = 10.0  # on SIGTERM: time running streams get to end cleanly
    decoders: tuple[str, ...] = ()  # "module:Class" plug-in formats to import and register
    security: ServerSecurity = field(default_factory=ServerSecurity)  # TLS, mTLS, bearer token
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0 picks one)
    # Directory of the content-digest cache, so a restart does not read every shard again;
    # None: no cache (the CLI defaults to $XDG_CACHE_HOME/shardstream or ~/.cache/shardstream).
    cache_dir: Path | None = None
    manifest: Path | None = None  # JSON from `shardstream index`: refuse to serve other data
    # Seconds a peer may make no progress: a stream whose client reads nothing (each
    # write waits on HTTP/2 flow control) is ended, and its client resumes elsewhere;
    # a new connection must finish its (TLS/HTTP/2) handshake within this time too.
    stream_stall_timeout: float = 30.0
    # Concurrent connections (each a file descriptor); more are closed at once, before
    # their handshake. The worker raises its open-files limit to fit, if it can.
    max_connections: int = 4096
    # Concurrent streams on one connection (HTTP/2 MAX_CONCURRENT_STREAMS): one client
    # cannot take every --max-streams slot; its further streams wait on its side.
    max_streams_per_connection: int = 16
    # Seconds a connection may stay without any call before it is closed (GOAWAY); its
    # client reconnects when it needs to. Loaders keep theirs busy with health watches.
    idle_connection_timeout: float = 300.0
    # Seconds a connection may live: then it is sent GOAWAY (clients open another for new
    # calls) and closed stream_stall_timeout later, ending what still runs on it (reads
    # are resumed). What bounds how long a client that reads nothing keeps a stalled
    # stream's chunk, and a connection that only watches health.
    max_connection_age: float = 600.0
    # Health Watch calls without a valid bearer token (all of them, without a token) at
    # once; more get RESOURCE_EXHAUSTED, so watches cannot hold every connection. A loader
    # sends its token on its watches. None: half of max_connections.
    max_health_watches: int | None = None
    # Keep the shards of an fsspec URL data root on local disk here, so later epochs and
    # restarts read them locally (`_shardcache`); None: every open reads the data root.
    shard_cache_dir: Path | None = None
    # At most this many bytes of copies: the least recently used are evicted first.
    shard_cache_bytes: int = 10 * GiB

    def __post_init__(self) -> None:
        self._normalise()
        self._check_datasets()
        self._check_limits()

    def _normalise(self) -> None:
        if isinstance(self.data_root, str) and "://" not in self.data_root:
            object.__setattr__(self, "data_root", Path(self.data_root))  # not a URL: a directory
        if self.cache_dir is not None or self.manifest is not None:  # the catalog reads specs
            specs = tuple(
                replace(
                    d,
                    cache_dir=d.cache_dir or self.cache_dir,
                    manifest=d.manifest or self.manifest,
                )
                for d in self.datasets
            )
            object.__setattr__(self, "datasets", specs)

    def _check_datasets(self) -> None:
        if not self.datasets:
            raise ValueError("a worker needs at least one dataset (--dataset NAME=GLOB)")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        for ref in self.decoders:
            if ":" not in ref:
                raise ValueError(f"--decoder must look like module:Class, got {ref!r}")

    def _check_limits(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.processes < 0:
            raise ValueError(f"processes must be >= 0, got {self.processes}")
        if not 64 * 1024 <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes must be in [65536, {MAX_MESSAGE_BYTES}], "
                f"got {self.max_message_bytes}"
            )
        if not 0 < self.chunk_bytes <= self.max_message_bytes // 2:
            raise ValueError(
                f"chunk_bytes must be in (0, max_message_bytes / 2 = "
                f"{self.max_message_bytes // 2}], got {self.chunk_bytes}"
            )
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be positive, got {self.max_streams}")
        if not 1 <= self.lane_slots <= 1024:
            raise ValueError(f"lane_slots must be in [1, 1024], got {self.lane_slots}")
        if not 0 <= self.network_lane_port <= 65535:
            port = self.network_lane_port
            raise ValueError(f"network_lane_port must be in [0, 65535], got {port}")
        if not 1 <= self.max_lanes <= 4096:
            raise ValueError(f"max_lanes must be in [1, 4096], got {self.max_lanes}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        for name in ("stream_stall_timeout", "idle_connection_timeout", "max_connection_age"):
            seconds = getattr(self, name)
            if not MIN_TIMEOUT <= seconds < 1e6:  # also refuses NaN
                raise ValueError(
                    f"{name} must be a number of seconds in (0, 1e6), at least {MIN_TIMEOUT} "
                    f"(gRPC counts whole milliseconds), got {seconds}"
                )
        if self.shard_cache_bytes < 1:
            raise ValueError(f"shard_cache_bytes must be positive, got {self.shard_cache_bytes}")
        if self.shard_cache_dir is not None and isinstance(self.data_root, Path):
            raise ValueError(
                f"--shard-cache-dir keeps local copies of the shards of an fsspec URL data root "
                f"(s3://, gs://, ...), but the data root {self.data_root} is a local directory, "
                "read in place: drop --shard-cache-dir"
            )
        for name in ("max_connections", "max_streams_per_connection", "max_health_watches"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 2**31 - 1:
                raise ValueError(f"{name} must be in [1, 2147483647], got {value}")

    @property
    def health_watches(self) -> int:
        """Health watches without a token at once (`max_health_watches`, or its default)."""
        if self.max_health_watches is not None:
            return self.max_health_watches
        return max(1, self.max_connections // 2)

    @property
    def health_watch_seconds(self) -> float:
        """How long one health Watch runs before the worker ends it (its client watches
        again): half the time an aged connection is given, so none is cut mid-watch."""
        return self.stream_stall_timeout / 2

    @property
    def address(self) -> str:
        return f"{url_host(self.host)}:{self.port}"
