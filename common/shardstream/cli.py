"""The `shardstream` command: worker, index, make-dataset, health, inspect, consume, audit,
demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shardstream._common import run_async
from shardstream.client._security import ClientSecurity, call_metadata, secure_channel
from shardstream.client._wire import WorkerStub, check_health
from shardstream.client.errors import ShardstreamError


def _health(args: argparse.Namespace) -> int:
    result: list[tuple[bool, str]] = []

    async def probe() -> int:
        result.append(
            await check_health(
                args.address, args.service, timeout=args.timeout, security=_security(args)
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
    import grpc

    security = _security(args)

    async def show() -> int:
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
            shown = ds.shards if args.dataset else ds.shards[:5]
            for s in shown:
                print(f"  {s.id}: {s.records} records, fingerprint {s.fingerprint}")
            if len(shown) < len(ds.shards):
                print(f"  ... {len(ds.shards) - len(shown)} more (name the dataset to see all)")
        return 0

    return run_async(show)


def _consume(args: argparse.Namespace) -> int:
    from shardstream.client._consume import consume

    options = {
        "dataset": args.dataset, "batch_size": args.batch_size, "rank": args.rank,
        "world_size": args.world_size, "seed": args.seed, "shuffle": args.shuffle,
        "security": _security(args), "describe_timeout": args.timeout,
    }  # fmt: skip
    try:
        return run_async(lambda: consume(args.addresses.split(","), args.epochs, options))
    except ShardstreamError as exc:
        print(f"shardstream consume: {exc}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from shardstream._demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            records=args.records,
            shards=args.shards,
            workers=args.workers,
            ranks=args.ranks,
            epochs=args.epochs,
            batch_size=args.batch_size,
            processes=args.processes,
        )
    )


def _audit(args: argparse.Namespace) -> int:
    from shardstream.client._ledger import audit

    ok = True
    try:
        for ep in audit(args.directory):
            ok &= ep.ok
            verdict = "exactly once" if ep.ok else "NOT exactly once"
            print(f"epoch {ep.epoch}: {ep.received} records received of {ep.expected} planned, "
                  f"{ep.resumes} resumed reads: {verdict}")  # fmt: skip
            for sid, start, n in ep.missing[: args.limit]:
                print(f"  missing    {sid} [{start}, {start + n})")
            for sid, start, n, times in ep.duplicated[: args.limit]:
                print(f"  duplicated {sid} [{start}, {start + n}) x{times}")
            hidden = len(ep.missing) + len(ep.duplicated) - 2 * args.limit
            if hidden > 0:
                print("  ... and more ranges (--limit)")
    except (OSError, ValueError, KeyError) as exc:
        print(f"shardstream audit: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    from shardstream.server.cli import (
        UsageParser,
        add_index_args,
        add_make_dataset_args,
        add_worker_args,
    )

    parser = UsageParser(prog="shardstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)  # of the same parser class

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
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("dataset", nargs="?", default="")
    p.add_argument("--timeout", type=float, default=10.0)
    add_security_args(p)
    p = sub.add_parser("consume", help="stream epochs from workers and report throughput")
    p.add_argument("addresses", metavar="ADDR[,ADDR...]", help="host:port or dns:///name:port")
    p.add_argument("--dataset", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for workers")
    add_security_args(p)
    p = sub.add_parser("audit", help="check a delivery ledger: every record exactly once")
    p.add_argument("directory", type=Path, metavar="LEDGER_DIR")
    p.add_argument("--limit", type=int, default=20, help="ranges shown per kind")
    p = sub.add_parser("demo", help="run everything locally on generated data")
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--processes", type=int, default=1, help="decoding processes per worker")
    return parser


def _add_health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    add_security_args(p)


def add_security_args(p: argparse.ArgumentParser) -> None:
    """Client-side TLS / token flags, shared by the commands that talk to workers."""
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA bundle to verify the worker with")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    p.add_argument("--tls-server-name", help="name to expect in the worker's certificate")
    p.add_argument("--auth-token-file", type=Path, help="file with the bearer token")


def _security(args: argparse.Namespace) -> ClientSecurity | None:
    security = ClientSecurity(
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        auth_token_file=args.auth_token_file,
    )
    return security if security.tls or security.auth_token_file else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        from shardstream.server.cli import worker_command

        return worker_command(args)
    if args.command == "make-dataset":
        from shardstream.server.cli import make_dataset_command

        return make_dataset_command(args)
    if args.command == "index":
        from shardstream.server.cli import index_command

        return index_command(args)
    commands = {
        "health": _health, "inspect": _inspect, "demo": _demo, "audit": _audit,
        "consume": _consume,
    }  # fmt: skip
    return commands[args.command](args)


def health_main(argv: Sequence[str] | None = None) -> int:
    """`shardstream-health HOST:PORT [--service NAME]`, for container health checks."""
    from shardstream.server.cli import UsageParser

    parser = UsageParser(prog="shardstream-health", description=health_main.__doc__)
    _add_health_args(parser)
    return _health(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
