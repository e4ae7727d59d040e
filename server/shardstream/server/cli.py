"""Command line of the worker: `shardstream worker` (also `shardstream-worker`).

Every flag has an environment variable (SHARDSTREAM_<FLAG>), which is how the
docker image is configured; flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from shardstream._common import run_async, tune_malloc
from shardstream.server._config import DatasetSpec, MiB, WorkerConfig
from shardstream.server._security import ServerSecurity
from shardstream.server._synth import FORMATS, make_dataset
from shardstream.server._worker import Worker
from shardstream.server.errors import CatalogError

log = logging.getLogger("shardstream.worker")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SHARDSTREAM_{name}", default)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    env_datasets = (_env("DATASETS") or "").split()
    p.add_argument(
        "--data-root",
        default=_env("DATA_ROOT"),
        help="directory (or fsspec URL) holding the shards [SHARDSTREAM_DATA_ROOT]",
    )
    p.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="NAME=GLOB[:FORMAT]",
        help="a dataset to serve; repeatable [SHARDSTREAM_DATASETS, space-separated]",
    )
    p.set_defaults(env_datasets=env_datasets)
    p.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address to listen on; 0.0.0.0 for all [SHARDSTREAM_HOST]",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", "50051") or 0),
        help="port; 0 picks a free one and logs it [SHARDSTREAM_PORT]",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=int(_env("PROCESSES", "1") or 0),
        help="decoding processes; 0 decodes in threads [SHARDSTREAM_PROCESSES]",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(_env("MAX_MESSAGE_BYTES", str(8 * MiB)) or 0),
        help="gRPC max message size [SHARDSTREAM_MAX_MESSAGE_BYTES]",
    )
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=int(_env("CHUNK_BYTES", str(4 * MiB)) or 0),
        help="target bytes per streamed chunk [SHARDSTREAM_CHUNK_BYTES]",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=int(_env("MAX_STREAMS", "64") or 0),
        help="concurrent read streams [SHARDSTREAM_MAX_STREAMS]",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=float(_env("GRACE", "10") or 0),
        help="seconds running streams get to end on SIGTERM [SHARDSTREAM_GRACE]",
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
        "--metrics-port",
        type=int,
        default=int(_env("METRICS_PORT") or -1),
        help="serve Prometheus metrics on this port (needs shardstream[metrics]) "
        "[SHARDSTREAM_METRICS_PORT]",
    )
    for flag, what in (
        ("--tls-cert", "PEM certificate chain: serve over TLS (with --tls-key)"),
        ("--tls-key", "PEM private key of --tls-cert"),
        ("--tls-client-ca", "PEM CA bundle: require client certificates signed by it (mTLS)"),
        ("--auth-token-file", "file with a bearer token every client must send (not health)"),
    ):
        env = flag[2:].upper().replace("-", "_")
        p.add_argument(flag, type=Path, default=_env(env), help=f"{what} [SHARDSTREAM_{env}]")
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING [SHARDSTREAM_LOG_LEVEL]",
    )


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    if args.data_root is None:
        raise ValueError("--data-root is required (or SHARDSTREAM_DATA_ROOT)")
    texts = args.datasets or args.env_datasets
    return WorkerConfig(
        data_root=args.data_root,  # a str: WorkerConfig keeps URLs, makes the rest a Path
        datasets=tuple(DatasetSpec.parse(t) for t in texts),
        host=args.host,
        port=args.port,
        processes=args.processes,
        max_message_bytes=args.max_message_bytes,
        chunk_bytes=args.chunk_bytes,
        max_streams=args.max_streams,
        grace_seconds=args.grace,
        decoders=tuple(args.decoders or (_env("DECODERS") or "").split()),
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        security=ServerSecurity(
            tls_cert=_path(args.tls_cert),
            tls_key=_path(args.tls_key),
            tls_client_ca=_path(args.tls_client_ca),
            auth_token_file=_path(args.auth_token_file),
        ),
    )


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


async def serve(config: WorkerConfig) -> int:
    """Run a worker until SIGTERM/SIGINT (drain; a second signal exits at once)."""
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
    try:
        async with worker:
            # The one line on stdout: scripts (and WorkerProcess) learn the port here.
            print(f"serving {worker.address}", flush=True)
            await worker.wait_closed()
        for task in drains:
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def worker_command(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"shardstream worker: {exc}", file=sys.stderr)
        return 2
    try:
        return run_async(lambda: serve(config))
    except (CatalogError, ValueError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


def add_make_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--records", type=int, default=1000, help="records in all shards together")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")


def make_dataset_command(args: argparse.Namespace) -> int:
    try:
        shape = tuple(int(d) for d in args.shape.split(",") if d.strip())
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
        print(f"shardstream make-dataset: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} {args.format} shards, {args.records} records, to {args.directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`shardstream-worker`: the same as `shardstream worker`."""
    parser = argparse.ArgumentParser(prog="shardstream-worker", description=__doc__)
    add_worker_args(parser)
    return worker_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
