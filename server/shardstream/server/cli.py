"""Command line of the worker: `shardstream worker` (also `shardstream-worker`).

Every flag has an environment variable (SHARDSTREAM_<FLAG>), which is how the
docker image is configured; flags win over the environment. A variable is read
as the default of its flag, so a malformed one (SHARDSTREAM_PORT=abc, or set but
empty) is a one-line usage error naming it (exit status 2) when it is used, never
for --help or another command. Datasets with transforms are configured in a TOML
file (`--config FILE`, see `_configfile`); flags and variables still work beside it.
For what both can set: a flag wins over the file, the file over the variable
(the image sets SHARDSTREAM_DATA_ROOT=/data, and a file's data_root still counts):
--data-root > data_root > SHARDSTREAM_DATA_ROOT; --dataset adds to the file's
datasets, SHARDSTREAM_DATASETS counts only when the file names none; likewise
--decoder and SHARDSTREAM_DECODERS with the file's decoders.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from shardstream._common import run_async, tune_malloc
from shardstream._common.args import (
    LOG_LEVEL,
    LOG_LEVELS,
    PATH,
    PORT,
    TEXT,
    TIMEOUT,
    EnvText,
    UsageParser,
    add_version_arg,
    checked,
    env,
    int_in,
    on_off,
    seconds,
    size_in,
)
from shardstream._common.sizes import format_size
from shardstream.server._catalog import index_in_threads
from shardstream.server._config import MAX_MESSAGE_BYTES, DatasetSpec, MiB, WorkerConfig
from shardstream.server._configfile import ConfigFile, check_formats, load_config_file
from shardstream.server._decoders import decoder_class, register_plugins
from shardstream.server._files import is_url, redact
from shardstream.server._manifest import manifest_of, manifest_text
from shardstream.server._security import ServerSecurity
from shardstream.server._synth import FORMATS, make_dataset
from shardstream.server._worker import Worker
from shardstream.server.errors import CatalogError

log = logging.getLogger("shardstream.worker")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """What to index: the data root, datasets, plug-in formats, the digest cache."""
    p.add_argument(
        "--data-root",
        type=TEXT,
        default=env("DATA_ROOT"),
        help="directory (or fsspec URL) holding the shards [SHARDSTREAM_DATA_ROOT]",
    )
    p.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="NAME=GLOB[:FORMAT]",
        help="a dataset; repeatable [SHARDSTREAM_DATASETS, space-separated]",
    )
    p.set_defaults(env_datasets=env("DATASETS"))
    p.add_argument(
        "--config",
        type=PATH,
        default=env("CONFIG"),
        metavar="FILE",
        help="TOML file: data_root, decoders and [datasets.NAME] tables (shards, format, "
        "transforms, schema); --data-root wins over its data_root, which wins over "
        "SHARDSTREAM_DATA_ROOT; --dataset adds datasets, SHARDSTREAM_DATASETS is used only "
        "if it names none [SHARDSTREAM_CONFIG]",
    )
    p.add_argument(
        "--decoder",
        action="append",
        dest="decoders",
        metavar="MODULE:CLASS",
        default=None,
        help="a plug-in format to load; repeatable [SHARDSTREAM_DECODERS, space-separated]",
    )
    p.add_argument(
        "--cache-dir",
        type=TEXT,
        default=env("CACHE_DIR"),
        metavar="DIR",
        help="where content digests are cached, so a restart does not read every shard "
        "again; 'off' (any case) for no cache (default: $XDG_CACHE_HOME/shardstream, else "
        "~/.cache/shardstream) [SHARDSTREAM_CACHE_DIR]",
    )
    p.add_argument(
        "--log-level",
        type=LOG_LEVEL,
        metavar="LEVEL",
        default=env("LOG_LEVEL", "INFO"),
        help=f"{', '.join(LOG_LEVELS)} [SHARDSTREAM_LOG_LEVEL]",
    )


def add_worker_args(p: argparse.ArgumentParser) -> None:
    add_dataset_args(p)
    p.add_argument(
        "--manifest",
        type=PATH,
        default=env("MANIFEST"),
        metavar="FILE",
        help="a manifest written by `shardstream index`: refuse to start unless every shard "
        "matches it [SHARDSTREAM_MANIFEST]",
    )
    p.add_argument(
        "--shard-cache-dir",
        type=PATH,
        default=env("SHARD_CACHE_DIR"),
        metavar="DIR",
        help="keep the shards of an fsspec URL data root on local disk here, so later epochs "
        "and restarts read them locally (default: no cache) [SHARDSTREAM_SHARD_CACHE_DIR]",
    )
    p.add_argument(
        "--shard-cache-bytes",
        type=size_in(1),
        default=env("SHARD_CACHE_BYTES", "10GiB"),
        metavar="SIZE",
        help="at most this much in --shard-cache-dir; the least recently used shards are "
        "evicted first [SHARDSTREAM_SHARD_CACHE_BYTES]",
    )
    p.add_argument(
        "--host",
        type=TEXT,
        default=env("HOST", "127.0.0.1"),
        help="address to listen on; 0.0.0.0 for all [SHARDSTREAM_HOST]",
    )
    p.add_argument(
        "--port",
        type=PORT,
        default=env("PORT", "50051"),
        help="port; 0 picks a free one and logs it [SHARDSTREAM_PORT]",
    )
    p.add_argument(
        "--processes",
        type=int_in(0),
        default=env("PROCESSES", "1"),
        help="decoding processes; 0 decodes in threads [SHARDSTREAM_PROCESSES]",
    )
    p.add_argument(
        "--max-message-bytes",
        type=size_in(64 * 1024, MAX_MESSAGE_BYTES),
        default=env("MAX_MESSAGE_BYTES", format_size(8 * MiB)),
        metavar="SIZE",
        help="gRPC max message size, e.g. 16MiB (under 2GiB) [SHARDSTREAM_MAX_MESSAGE_BYTES]",
    )
    p.add_argument(
        "--chunk-bytes",
        type=size_in(1),
        default=env("CHUNK_BYTES"),
        metavar="SIZE",
        help=f"target size of one streamed chunk, at most half of --max-message-bytes; when "
        f"not given, {format_size(DEFAULT_CHUNK_BYTES)} or that half if less "
        "[SHARDSTREAM_CHUNK_BYTES]",
    )
    p.add_argument(
        "--max-streams",
        type=int_in(1),
        default=env("MAX_STREAMS", "64"),
        help="concurrent read streams [SHARDSTREAM_MAX_STREAMS]",
    )
    p.add_argument(
        "--grace",
        type=checked(seconds, "a number of seconds >= 0"),
        default=env("GRACE", "10"),
        help="seconds running streams get to end on SIGTERM [SHARDSTREAM_GRACE]",
    )
    p.add_argument(
        "--exit-with-parent",
        type=int_in(1),
        default=env("EXIT_WITH_PARENT"),
        metavar="PID",
        help="drain and exit once process PID is no longer this worker's parent (local "
        "fleets started by a program: the demo, tests; none in containers) "
        "[SHARDSTREAM_EXIT_WITH_PARENT]",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=TIMEOUT,
        default=env("STREAM_STALL_TIMEOUT", "30"),
        metavar="SECONDS",
        help="end a stream whose client reads nothing for this long (it resumes elsewhere), "
        "and a connection still in its handshake [SHARDSTREAM_STREAM_STALL_TIMEOUT]",
    )
    p.add_argument(
        "--max-connections",
        type=int_in(1, 2**31 - 1),
        default=env("MAX_CONNECTIONS", "4096"),
        help="concurrent connections; more are closed at once [SHARDSTREAM_MAX_CONNECTIONS]",
    )
    p.add_argument(
        "--max-streams-per-connection",
        type=int_in(1, 2**31 - 1),
        default=env("MAX_STREAMS_PER_CONNECTION", "16"),
        help="concurrent streams on one connection; a client's further ones wait "
        "[SHARDSTREAM_MAX_STREAMS_PER_CONNECTION]",
    )
    p.add_argument(
        "--lanes",
        type=checked(on_off, "on or off"),
        default=env("LANES", "on"),
        metavar="on|off",
        help="same-host lanes: clients on this host get chunks through shared memory "
        "instead of the socket [SHARDSTREAM_LANES]",
    )
    p.add_argument(
        "--network-lanes",
        type=checked(on_off, "on or off"),
        default=env("NETWORK_LANES", "on"),
        metavar="on|off",
        help="network lanes: clients on other hosts get chunks over a plain TCP connection "
        "beside the gRPC one (about 40%% less CPU on both sides than gRPC's bytes); never "
        "with TLS, whose clients get bytes on the socket [SHARDSTREAM_NETWORK_LANES]",
    )
    p.add_argument(
        "--network-lane-port",
        type=int_in(0, 65535),
        default=env("NETWORK_LANE_PORT", "0"),
        help="TCP port of the network lanes, on --host; 0 picks a free one (clients learn "
        "it from the worker; open it where a firewall stands between them) "
        "[SHARDSTREAM_NETWORK_LANE_PORT]",
    )
    p.add_argument(
        "--lane-slots",
        type=int_in(1, 1024),
        default=env("LANE_SLOTS", "64"),
        help="most slots in one client's lane, and this x --max-message-bytes its most "
        "bytes (a loader asks for as many slots as it may hold chunks, each a whole read; "
        "memory is taken as slots are written) [SHARDSTREAM_LANE_SLOTS]",
    )
    p.add_argument(
        "--max-lanes",
        type=int_in(1, 4096),
        default=env("MAX_LANES", "16"),
        help="clients with a lane at once; others get chunks on the socket [SHARDSTREAM_MAX_LANES]",
    )
    p.add_argument(
        "--idle-connection-timeout",
        type=TIMEOUT,
        default=env("IDLE_CONNECTION_TIMEOUT", "300"),
        metavar="SECONDS",
        help="close a connection without calls for this long [SHARDSTREAM_IDLE_CONNECTION_TIMEOUT]",
    )
    p.add_argument(
        "--max-connection-age",
        type=TIMEOUT,
        default=env("MAX_CONNECTION_AGE", "600"),
        metavar="SECONDS",
        help="send a connection GOAWAY after this long and close it --stream-stall-timeout "
        "later (clients reconnect; reads still running resume) "
        "[SHARDSTREAM_MAX_CONNECTION_AGE]",
    )
    p.add_argument(
        "--max-health-watches",
        type=int_in(1, 2**31 - 1),
        default=env("MAX_HEALTH_WATCHES"),
        help="health Watch calls without a valid token at once (default: half of "
        "--max-connections); more get RESOURCE_EXHAUSTED [SHARDSTREAM_MAX_HEALTH_WATCHES]",
    )
    p.add_argument(
        "--metrics-port",
        type=PORT,
        default=env("METRICS_PORT"),
        help="serve Prometheus metrics on this port (needs shardstream[metrics]) "
        "[SHARDSTREAM_METRICS_PORT]",
    )
    for flag, what in (
        ("--tls-cert", "PEM certificate chain: serve over TLS (with --tls-key)"),
        ("--tls-key", "PEM private key of --tls-cert"),
        ("--tls-client-ca", "PEM CA bundle: require client certificates signed by it (mTLS)"),
        ("--auth-token-file", "file with a bearer token every client must send (not health)"),
    ):
        name = flag[2:].upper().replace("-", "_")
        p.add_argument(
            flag, type=PATH, default=env(name), metavar="FILE", help=f"{what} [SHARDSTREAM_{name}]"
        )


DEFAULT_CHUNK_BYTES = 4 * MiB  # --chunk-bytes when not given (if under half a message)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Inputs:
    """What to serve or index: from the flags, the --config file and the variables."""

    data_root: str  # a directory or an fsspec URL
    datasets: tuple[DatasetSpec, ...]
    decoders: tuple[str, ...]  # "module:Class", every one imported and registered
    # Where the data root came from, and the variables the file overrode: logged once
    # the configuration is known to be good (a usage error stays one line).
    notes: tuple[str, ...]

    def log(self) -> None:
        for note in self.notes:
            log.info("%s", note)


def _inputs(args: argparse.Namespace) -> _Inputs:
    """The data root, datasets and decoders, each a flag's, else the file's, else its
    variable's (flags add datasets and decoders to the file's); ValueError (one line)
    for a missing data root, a decoder that does not load, or an unknown format."""
    file = None if args.config is None else load_config_file(args.config)  # loads decoders
    notes: list[str] = []
    data_root = _data_root(args, file, notes)
    refs = _decoders(args, file, notes)
    try:
        register_plugins(refs)  # plug-in formats, before the datasets' formats are checked
    except ValueError as exc:
        given = "--decoder" if args.decoders else "SHARDSTREAM_DECODERS"
        raise ValueError(f"{given}: {exc}") from None
    if file is not None:
        check_formats(file)
    datasets = _specs(args, file, notes)
    for spec, given in datasets:
        if spec.format is not None:
            try:
                decoder_class(spec.format)
            except ValueError as exc:
                raise ValueError(f"{given} {spec.name}: {exc}") from None
    found = (() if file is None else file.datasets) + tuple(spec for spec, _ in datasets)
    return _Inputs(
        data_root=data_root,
        datasets=found,
        decoders=(() if file is None else file.decoders) + refs,
        notes=tuple(notes),
    )


def _specs(
    args: argparse.Namespace, file: ConfigFile | None, notes: list[str]
) -> tuple[tuple[DatasetSpec, str], ...]:
    """The datasets of --dataset (added to the file's), else of SHARDSTREAM_DATASETS
    unless the file names datasets; each with what gave it."""
    if args.datasets:
        return tuple((DatasetSpec.parse(t), "--dataset") for t in args.datasets)
    if not args.env_datasets:
        return ()
    if file is not None and file.datasets:
        notes.append(f"SHARDSTREAM_DATASETS is not used: {file.path} names the datasets")
        return ()
    specs = []
    for text in args.env_datasets.split():
        try:
            specs.append((DatasetSpec.parse(text), "SHARDSTREAM_DATASETS"))
        except ValueError as exc:
            raise ValueError(f"SHARDSTREAM_DATASETS: {exc}") from None
    return tuple(specs)


def _data_root(args: argparse.Namespace, file: ConfigFile | None, notes: list[str]) -> str:
    """--data-root, else the file's data_root, else SHARDSTREAM_DATA_ROOT (the flag's
    default, an EnvText); `notes` gets where it came from."""
    given: str | None = args.data_root
    from_file = None if file is None else file.data_root
    in_file = f"data_root in {'' if file is None else file.path}"
    if given is not None and not isinstance(given, EnvText):
        root, source = given, "--data-root"
        if from_file is not None:
            source += f"; {in_file} is not used"
    elif from_file is not None:
        root, source = from_file, in_file
        if isinstance(given, EnvText):
            source += f"; {given.variable}={given} is not used"
    elif given is not None:
        root, source = given, given.variable
    else:
        raise ValueError(
            "--data-root is required (or data_root in the --config file, or SHARDSTREAM_DATA_ROOT)"
        )
    notes.append(f"data root {redact(str(root))} (from {source})")  # no password in the log
    return str(root)


def _cache_dir(args: argparse.Namespace) -> Path | None:
    """--cache-dir, 'off', or the user's cache directory (None if there is no home)."""
    if args.cache_dir is not None:
        off = args.cache_dir.strip().lower() == "off"  # as --lanes: any case
        return None if off else Path(args.cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "shardstream"
    try:
        return Path.home() / ".cache" / "shardstream"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        return None


def _decoders(
    args: argparse.Namespace, file: ConfigFile | None, notes: list[str]
) -> tuple[str, ...]:
    """--decoder (added to the file's), else SHARDSTREAM_DECODERS unless the file names
    decoders."""
    if args.decoders:
        return tuple(args.decoders)
    refs = tuple((env("DECODERS") or "").split())
    if refs and file is not None and file.decoders:
        notes.append(f"SHARDSTREAM_DECODERS is not used: {file.path} names the decoders")
        return ()
    return refs


def _chunk_bytes(args: argparse.Namespace) -> int:
    """--chunk-bytes, at most half of --max-message-bytes; when not given, the default
    or that half if less (so --max-message-bytes alone is never refused)."""
    half: int = args.max_message_bytes // 2
    if args.chunk_bytes is None:
        return min(DEFAULT_CHUNK_BYTES, half)
    if args.chunk_bytes > half:
        raise ValueError(
            f"--chunk-bytes [SHARDSTREAM_CHUNK_BYTES] must be at most half of "
            f"--max-message-bytes [SHARDSTREAM_MAX_MESSAGE_BYTES], here {half} bytes, got "
            f"{args.chunk_bytes} bytes: lower it, or raise --max-message-bytes"
        )
    return int(args.chunk_bytes)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    inputs = _inputs(args)
    config = WorkerConfig(
        data_root=inputs.data_root,  # a str: WorkerConfig keeps URLs, makes the rest a Path
        datasets=inputs.datasets,
        host=str(args.host),
        port=args.port,
        processes=args.processes,
        max_message_bytes=args.max_message_bytes,
        chunk_bytes=_chunk_bytes(args),
        max_streams=args.max_streams,
        grace_seconds=args.grace,
        stream_stall_timeout=args.stream_stall_timeout,
        max_connections=args.max_connections,
        max_streams_per_connection=args.max_streams_per_connection,
        idle_connection_timeout=args.idle_connection_timeout,
        max_connection_age=args.max_connection_age,
        max_health_watches=args.max_health_watches,
        lanes=args.lanes,
        network_lanes=args.network_lanes,
        network_lane_port=args.network_lane_port,
        lane_slots=args.lane_slots,
        max_lanes=args.max_lanes,
        decoders=inputs.decoders,
        metrics_port=args.metrics_port,
        cache_dir=_cache_dir(args),
        manifest=args.manifest,
        shard_cache_dir=args.shard_cache_dir,
        shard_cache_bytes=args.shard_cache_bytes,
        security=ServerSecurity(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_token_file=args.auth_token_file,
        ),
    )
    inputs.log()  # the data root in use, once the configuration is good
    return config


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Redacting())
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        handlers=[handler],
    )


class _Redacting(logging.Filter):
    """Hides the password of any URL a log line names (a data root's, a shard's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


async def serve(config: WorkerConfig, *, parent: int | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT (drain; a second signal exits at once), or,
    with `parent`, until that process is no longer its parent (then it drains too)."""
    tune_malloc()
    loop = asyncio.get_running_loop()
    worker = Worker(config)
    drains: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if drains:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: draining (grace %.1fs)", signal.Signals(signum).name, config.grace_seconds)
        drains.append(loop.create_task(worker.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if parent is not None:  # after the handlers: its SIGTERM drains, never kills
        threading.Thread(target=_drain_without, args=(parent,), daemon=True).start()
    try:
        async with worker:
            # The one line on stdout: scripts (and WorkerProcess) learn the port here. It
            # names what the worker listens on: 0.0.0.0:PORT for --host 0.0.0.0.
            print(f"serving {worker.listen_address}", flush=True)
            await worker.wait_closed()
        for task in drains:
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


PARENT_POLL_SECONDS = 0.5


def _check_parent(parent: int | None) -> None:
    """ValueError unless `parent` (--exit-with-parent) is this process's parent: any
    other pid would look gone at once, and the worker drain as it starts."""
    if parent is not None and parent != os.getppid():
        raise ValueError(
            f"--exit-with-parent {parent} is not this worker's parent (its parent is pid "
            f"{os.getppid()}): give the pid of the process that starts the worker, or drop it"
        )


def _drain_without(parent: int) -> None:
    """Poll for this process being re-parented (its parent died, even by SIGKILL), then
    SIGTERM itself: the drain a signal gives. (Not PR_SET_PDEATHSIG: that fires when the
    parent's *thread* that started this process ends, which is no death at all.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    log.warning("parent process %d is gone: draining", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def worker_command(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        _check_parent(args.exit_with_parent)
        config = config_from_args(args)
    except ValueError as exc:
        print(f"shardstream worker: {exc}", file=sys.stderr)
        return 2
    try:
        return run_async(lambda: serve(config, parent=args.exit_with_parent))
    except (CatalogError, ValueError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


def add_index_args(p: argparse.ArgumentParser) -> None:
    add_dataset_args(p)
    p.add_argument(
        "-o",
        "--output",
        type=PATH,
        metavar="FILE",
        help="write the manifest to FILE (default: standard output)",
    )


def index_command(args: argparse.Namespace) -> int:
    """Index datasets as a worker would and write their manifest (`_manifest`)."""
    setup_logging(args.log_level)
    try:
        if args.output is not None and args.output.is_dir():
            raise ValueError(f"-o/--output names a directory, {args.output}: give a file name")
        inputs = _inputs(args)
        data_root = inputs.data_root
        root: Path | str = data_root if is_url(data_root) else Path(data_root)
        cache_dir = _cache_dir(args)
        specs = tuple(replace(s, cache_dir=cache_dir) for s in inputs.datasets)
        if not specs:
            raise ValueError(
                "name a dataset: --dataset NAME=GLOB (or SHARDSTREAM_DATASETS), or --config"
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):  # as a worker refuses them: one manifest each
            raise ValueError(f"dataset names must be unique, got {names}")
        inputs.log()
    except ValueError as exc:
        print(f"shardstream index: {exc}", file=sys.stderr)
        return 2
    try:
        catalog = run_async(lambda: index_in_threads(root, specs))
    except CatalogError as exc:
        log.error("cannot index: %s", exc)
        return 1
    text = manifest_text(manifest_of(catalog))
    if args.output is None:
        sys.stdout.write(text)
    else:
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(args.output)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # no stray temporary file beside it
            log.error("cannot write %s: %s", args.output, exc.strerror or exc)
            return 1
    for ds in catalog.datasets.values():
        log.info(
            "manifest of dataset %r: %d shards, %d records, %.3f GB, fingerprint %s",
            ds.name,
            len(ds.shards),
            ds.total_records,
            sum(s.size for s in ds.shards) / 1e9,
            ds.fingerprint,
        )
    return 0


def add_make_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="where to write the shards (created if missing)")
    p.add_argument("--shards", type=int_in(1), default=8, help="shard files")
    p.add_argument("--records", type=int_in(1), default=1000, help="records in all shards together")
    p.add_argument(
        "--shape",
        default="32,32,3",
        help="per-record image shape, e.g. 32,32,3 (wds: H,W,3; workers decode wds images to "
        "SHARDSTREAM_WDS_SIZE, so set it to H for square images)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="npz",
        help="npz, csv; wds (JPEG tar shards, needs Pillow); parquet (needs pyarrow)",
    )
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the generated images")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the directory's shards of this format (and remove any beyond --shards)",
    )


def make_dataset_command(args: argparse.Namespace) -> int:
    try:
        shape = tuple(int(d) for d in args.shape.split(",") if d.strip())
    except ValueError:
        print(
            f"shardstream make-dataset: --shape must be comma-separated sizes, e.g. 32,32,3; "
            f"got {args.shape!r}",
            file=sys.stderr,
        )
        return 2
    try:
        paths = make_dataset(
            args.directory,
            shards=args.shards,
            records=args.records,
            shape=shape,
            format=args.format,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except ValueError as exc:
        # `make_dataset` speaks Python (overwrite=True); on the command line it is a flag.
        message = str(exc).replace("overwrite=True", "--overwrite")
        print(f"shardstream make-dataset: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        why = exc.strerror or str(exc)
        print(f"shardstream make-dataset: cannot write to {args.directory}: {why}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} {args.format} shards, {args.records} records, to {args.directory}")
    return 0


def build_parser() -> UsageParser:
    """The parser of `shardstream-worker`."""
    parser = UsageParser(prog="shardstream-worker", description=__doc__)
    add_version_arg(parser)
    add_worker_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`shardstream-worker`: the same as `shardstream worker`."""
    return worker_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
