"""The `shardstream` command: worker, index, make-dataset, health, inspect, consume, audit,
demo."""

from __future__ import annotations

# First: gRPC's settings (GRPC_VERBOSITY=ERROR, ...) are read when grpc is first imported.
import shardstream._common.environment  # noqa: F401  # isort: skip

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from shardstream._common import run_async
from shardstream._common.args import PATH, TIMEOUT, UsageParser, add_version_arg, checked, int_in
from shardstream.client._resolve import split_host_port
from shardstream.client._security import ClientSecurity, call_metadata, secure_channel
from shardstream.client._wire import WorkerStub, check_health
from shardstream.client.errors import ConfigError, ShardstreamError
from shardstream.server.cli import (
    add_index_args,
    add_make_dataset_args,
    add_worker_args,
    index_command,
    make_dataset_command,
    worker_command,
)

# At most this long to find out that a worker cannot be reached (`inspect`, `consume`):
# a refused connection or failed handshake is known at once, a silent host takes this long.
PROBE_SECONDS = 5.0
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _address(text: str) -> str:
    """A worker address with its port: HOST:PORT, [IPv6]:PORT or dns:///NAME:PORT."""
    host, port = split_host_port(text.strip())  # ValueError without a port
    if not 0 < port < 65536:
        raise ValueError(text)
    bare = text.strip().rpartition(":")[0]
    if ":" in host and not bare.startswith(("[", "dns:", "ipv4:", "ipv6:")):
        # "::1:50051" would split anywhere: gRPC needs the brackets.
        raise argparse.ArgumentTypeError(
            f"{text.strip()!r}: an IPv6 address takes brackets before its port, "
            f"e.g. [{host}]:{port}"
        )
    return text.strip()


def _addresses(text: str) -> list[str]:
    return [_address(a) for a in text.split(",")]


_HOST_PORT = "HOST:PORT (the port is needed), e.g. localhost:50051, or dns:///NAME:PORT"
_ADDRESS = checked(_address, _HOST_PORT)
_ADDRESSES = checked(_addresses, f"comma-separated worker addresses, each {_HOST_PORT}")


async def _unreachable(address: str, security: ClientSecurity | None, timeout: float) -> str | None:
    """Why a worker cannot be reached, in `health`'s words (refused, failed handshake, no
    answer within `timeout`), or None if it answers, serving or not."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with secure_channel(address, (), security) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                return f"{address}: {exc.code().name}: {exc.details()}"
    return None


def _health(args: argparse.Namespace) -> int:
    result: list[tuple[bool, str]] = []

    async def probe() -> int:
        result.append(
            await check_health(
                args.address, args.service, timeout=args.timeout, security=args.security
            )
        )
        return 0

    try:
        run_async(probe)
    except ValueError as exc:  # unreadable TLS files
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 2
    ok, reason = result[0]
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _inspect(args: argparse.Namespace) -> int:
    security = args.security

    async def show() -> int:
        why = await _unreachable(args.address, security, min(args.timeout, PROBE_SECONDS))
        if why is not None:
            print(why, file=sys.stderr)
            return 1
        async with secure_channel(args.address, (), security) as channel:
            stub = WorkerStub(channel, call_metadata(security))
            try:
                if args.dataset:
                    datasets = [await stub.describe(args.dataset, timeout=args.timeout)]
                else:
                    datasets = await stub.list_datasets(timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        for ds in datasets:
            print(f"dataset {ds.name}: format {ds.format}, {len(ds.shards)} shards, "
                  f"{ds.total_records} records, fingerprint {ds.fingerprint}")  # fmt: skip
            print(f"  schema: {', '.join(map(str, ds.schema))}")
            if ds.record_bytes:
                print(f"  a record: {ds.record_bytes} bytes (mean of a sample; sizes reads)")
            shown = ds.shards if args.dataset else ds.shards[:5]
            for s in shown:
                print(f"  {s.id}: {s.records} records, fingerprint {s.fingerprint}")
            if len(shown) < len(ds.shards):
                print(f"  ... {len(ds.shards) - len(shown)} more (name the dataset to see all)")
        return 0

    try:
        return run_async(show)
    except ValueError as exc:  # unreadable TLS or token files
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 2


def _consume(args: argparse.Namespace) -> int:
    from shardstream.client._consume import consume

    options = {
        "dataset": args.dataset, "batch_size": args.batch_size, "rank": args.rank,
        "world_size": args.world_size, "seed": args.seed,
        "shuffle": args.shuffle or args.shuffle_reads > 0, "shuffle_reads": args.shuffle_reads,
        "security": args.security, "describe_timeout": args.timeout,
        "ledger_dir": None if args.ledger_dir is None else str(args.ledger_dir),
    }  # fmt: skip

    async def run() -> int:
        probe = min(args.timeout, PROBE_SECONDS)
        reasons = await asyncio.gather(*(_unreachable(a, args.security, probe)
                                         for a in args.addresses))  # fmt: skip
        if all(reasons):  # none can be reached: say why now, not after --timeout
            for why in reasons:
                print(f"shardstream consume: {why}", file=sys.stderr)
            return 1
        return await consume(args.addresses, args.epochs, options)

    try:
        return run_async(run)
    except ConfigError as exc:
        print(f"shardstream consume: {exc}", file=sys.stderr)
        return 2
    except ShardstreamError as exc:
        print(f"shardstream consume: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # unreadable TLS or token files
        print(f"shardstream consume: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from shardstream._demo import DemoOptions, run_demo

    try:
        options = DemoOptions(
            records=args.records,
            shards=args.shards,
            workers=args.workers,
            ranks=args.ranks,
            epochs=args.epochs,
            batch_size=args.batch_size,
            processes=args.processes,
        )
    except ValueError as exc:  # a combination that cannot run, e.g. more shards than records
        print(f"shardstream demo: error: {exc}", file=sys.stderr)
        return 2
    return run_demo(options)


def _audit(args: argparse.Namespace) -> int:
    from shardstream.client._ledger import LedgerError, audit

    ok = True
    try:
        for ep in audit(args.directory):
            ok &= ep.ok
            verdict = "exactly once" if ep.ok else "NOT exactly once"
            skipped = f", {ep.skipped} skipped as bad" if ep.skipped else ""
            print(f"epoch {ep.epoch}: {ep.received} records received of {ep.expected} planned"
                  f"{skipped}, {ep.resumes} resumed reads: {verdict}")  # fmt: skip
            for sid, start, n in ep.missing[: args.limit]:
                print(f"  missing    {sid} [{start}, {start + n})")
            for sid, start, n, times in ep.duplicated[: args.limit]:
                print(f"  duplicated {sid} [{start}, {start + n}) x{times}")
            for sid, start, n in ep.unplanned[: args.limit]:
                print(f"  unplanned  {sid} [{start}, {start + n})")
            shown = (ep.missing, ep.duplicated, ep.unplanned)
            if any(len(kind) > args.limit for kind in shown):
                print("  ... and more ranges (--limit)")
    except LedgerError as exc:  # what the ledger holds cannot be audited: a failure
        print(f"shardstream audit: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"shardstream audit: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def build_parser() -> UsageParser:
    parser = UsageParser(prog="shardstream", description=__doc__)
    add_version_arg(parser)
    sub = parser.add_subparsers(
        dest="command", required=True, help="what to do; COMMAND --help shows its flags"
    )  # of the same parser class

    p = sub.add_parser("worker", help="serve datasets to clients")
    add_worker_args(p)
    p = sub.add_parser(
        "index",
        help="read every shard of datasets as a worker would and write their manifest "
        "(for worker --manifest)",
    )
    add_index_args(p)
    p = sub.add_parser("make-dataset", help="write synthetic shards")
    add_make_dataset_args(p)
    p = sub.add_parser("health", help="exit 0 iff a worker reports SERVING")
    _add_health_args(p)
    p = sub.add_parser("inspect", help="show a worker's datasets, shards, counts, schema")
    p.add_argument("address", type=_ADDRESS, metavar="HOST:PORT", help="the worker")
    p.add_argument("dataset", nargs="?", default="", help="show this dataset's every shard")
    p.add_argument("--timeout", type=TIMEOUT, default=10.0, metavar="SECONDS", help="per call")
    add_security_args(p)
    p = sub.add_parser("consume", help="stream epochs from workers and report throughput")
    p.add_argument(
        "addresses",
        type=_ADDRESSES,
        metavar="ADDR[,ADDR...]",
        help="the workers: host:port or dns:///name:port",
    )
    p.add_argument("--dataset", default="train", help="the dataset to read")
    p.add_argument("--batch-size", type=int_in(1), default=64, help="records per batch")
    p.add_argument("--epochs", type=int_in(1), default=1, help="epochs to read")
    p.add_argument(
        "--rank",
        type=int_in(0),
        default=None,
        help="this rank (default: from the launcher, e.g. RANK, else 0)",
    )
    p.add_argument(
        "--world-size",
        type=int_in(1),
        default=None,
        help="ranks in all (default: from the launcher, e.g. WORLD_SIZE, else 1)",
    )
    p.add_argument("--seed", type=int_in(0), default=0, help="base of every shuffle")
    p.add_argument("--shuffle", action="store_true", help="shuffle the shard order per epoch")
    p.add_argument(
        "--shuffle-reads",
        type=int_in(0),
        default=0,
        metavar="N",
        help="record-level shuffle over the whole epoch, records mixed in groups "
        "of N reads (implies --shuffle; holds N reads more in memory)",
    )
    p.add_argument(
        "--ledger-dir",
        type=PATH,
        metavar="DIR",
        help="write what is received to a delivery ledger in DIR, for `shardstream audit DIR`",
    )
    p.add_argument(
        "--timeout",
        type=TIMEOUT,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for reachable workers to describe the dataset",
    )
    add_security_args(p)
    p = sub.add_parser("audit", help="check a delivery ledger: every record exactly once")
    p.add_argument(
        "directory",
        type=Path,
        metavar="LEDGER_DIR",
        help="a ledger directory (Loader ledger_dir, consume --ledger-dir)",
    )
    p.add_argument("--limit", type=int_in(0), default=20, help="ranges shown per kind")
    p = sub.add_parser("demo", help="run everything locally on generated data")
    p.add_argument("--records", type=int_in(1), default=20_000, help="records generated")
    p.add_argument("--shards", type=int_in(1), default=8, help="shard files generated")
    p.add_argument("--workers", type=int_in(1), default=2, help="worker processes")
    p.add_argument("--ranks", type=int_in(1), default=2, help="loader ranks")
    p.add_argument("--epochs", type=int_in(1), default=2, help="epochs each rank reads")
    p.add_argument("--batch-size", type=int_in(1), default=64, help="records per batch")
    p.add_argument("--processes", type=int_in(0), default=1, help="decoding processes per worker")
    return parser


def _add_health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", type=_ADDRESS, metavar="HOST:PORT", help="the worker")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=TIMEOUT, default=5.0, metavar="SECONDS", help="for the answer")
    add_security_args(p)


def add_security_args(p: argparse.ArgumentParser) -> None:
    """Client-side TLS / token flags, shared by the commands that talk to workers."""
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument(
        "--tls-ca", type=PATH, metavar="FILE", help="PEM CA bundle to verify the worker with"
    )
    p.add_argument("--tls-cert", type=PATH, metavar="FILE", help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", type=PATH, metavar="FILE", help="PEM key of --tls-cert")
    p.add_argument(
        "--tls-server-name", metavar="NAME", help="name to expect in the worker's certificate"
    )
    p.add_argument(
        "--auth-token-file", type=PATH, metavar="FILE", help="file with the bearer token"
    )


def _security_of(args: argparse.Namespace) -> ClientSecurity | None:
    """The security flags as a ClientSecurity (None: plain, no token); ValueError for a
    contradiction (--tls-cert without --tls-key)."""
    security = ClientSecurity(
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        auth_token_file=args.auth_token_file,
    )
    return security if security.tls or security.auth_token_file else None


COMMANDS = {
    "worker": worker_command, "index": index_command, "make-dataset": make_dataset_command,
    "health": _health, "inspect": _inspect, "consume": _consume, "audit": _audit, "demo": _demo,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("health", "inspect", "consume"):
        try:
            args.security = _security_of(args)
        except ValueError as exc:
            print(f"shardstream {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return _to_stdout(COMMANDS[args.command], args)


def _to_stdout(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command whose output may go to a reader that leaves early (`| head`): a
    closed pipe ends it quietly, exit status 1, rather than with a traceback."""
    try:
        code = command(args)
        sys.stdout.flush()  # here, not at exit, where its error is a traceback
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def build_health_parser() -> UsageParser:
    """The parser of `shardstream-health`."""
    parser = UsageParser(prog="shardstream-health", description=health_main.__doc__)
    add_version_arg(parser)
    _add_health_args(parser)
    return parser


def health_main(argv: Sequence[str] | None = None) -> int:
    """`shardstream-health HOST:PORT [--service NAME]`, for container health checks."""
    args = build_health_parser().parse_args(argv)
    try:
        args.security = _security_of(args)
    except ValueError as exc:
        print(f"shardstream-health: error: {exc}", file=sys.stderr)
        return 2
    return _to_stdout(_health, args)


if __name__ == "__main__":
    raise SystemExit(main())
