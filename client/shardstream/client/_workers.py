"""What the client knows of one worker (`Conn`), and how two descriptions differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from shardstream.client._lanes import ClientLane, NetworkLane
from shardstream.client._wire import DatasetDesc, HealthWatch, WorkerStub


@dataclass(eq=False)
class Conn:
    """One worker address and what the client knows of it."""

    address: str
    channel: grpc.aio.Channel
    stub: WorkerStub
    health: HealthWatch
    serving: bool = True  # last health report (assumed until the first one)
    watch_call: grpc.aio.UnaryStreamCall | None = None
    rewatch: bool = False  # the watch call was cancelled to ask again
    outstanding: int = 0  # reads running on it
    failures: int = 0  # consecutive failures, for backoff
    down_until: float = 0.0  # loop time before which it gets no reads
    drained: bool = False  # `down_until` holds a drained worker until it serves again
    last_error: str = ""
    verified: bool = False  # it described the dataset as the others do
    excluded: str = ""  # why it never gets reads (it disagrees on the dataset)
    assigned: int = field(default=0)  # reads ever given, for tie-breaking
    # Further connections for reads (`connections_per_worker` > 1): reads take `stub` and
    # these in turn, so their messages arrive on several TCP connections at once.
    extra: list[tuple[grpc.aio.Channel, WorkerStub]] = field(default_factory=list)
    lane: ClientLane | NetworkLane | None = None  # a same-host or network lane, once open
    lane_opening: bool = False

    def read_stub(self) -> WorkerStub:
        """The stub of the connection the next read goes on (round robin)."""
        if not self.extra:
            return self.stub
        turn = self.assigned % (len(self.extra) + 1)
        return self.stub if turn == 0 else self.extra[turn - 1][1]

    def channels(self) -> list[grpc.aio.Channel]:
        return [self.channel, *(c for c, _ in self.extra)]

    def release(self) -> None:
        """Drop the closed connection's gRPC objects (what the loader knew of the worker
        stays, for its statistics): grpc's process-wide poller thread stops once no
        channel is left, which must happen while the interpreter still runs, not in its
        teardown at exit (where it can abort the process)."""
        gone = cast(Any, None)
        self.channel, self.stub, self.health = gone, gone, gone
        self.watch_call = None
        self.extra = []


def describe_difference(a: DatasetDesc, b: DatasetDesc) -> str:
    """What differs between two descriptions, in a few words."""
    if a.schema != b.schema:
        return f"schema [{', '.join(map(str, a.schema))}] vs [{', '.join(map(str, b.schema))}]"
    ids_a, ids_b = [s.id for s in a.shards], [s.id for s in b.shards]
    if ids_a != ids_b:
        only_a = sorted(set(ids_a) - set(ids_b))[:3]
        only_b = sorted(set(ids_b) - set(ids_a))[:3]
        return (
            f"{len(ids_a)} vs {len(ids_b)} shards "
            f"(only in the first: {only_a}, only in the second: {only_b})"
        )
    for sa, sb in zip(a.shards, b.shards, strict=True):
        if sa.records != sb.records:
            return f"shard {sa.id!r} has {sa.records} vs {sb.records} records"
        if sa.fingerprint != sb.fingerprint:
            return f"shard {sa.id!r} has fingerprint {sa.fingerprint} vs {sb.fingerprint}"
    if a.fingerprint == b.fingerprint and a.record_bytes != b.record_bytes:
        return (
            f"a record's measured mean size, {a.record_bytes} vs {b.record_bytes} bytes (workers "
            "of other versions, or transforms whose code differs)"
        )
    return f"fingerprint {a.fingerprint} vs {b.fingerprint}"
