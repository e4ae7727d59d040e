"""Producer processes of the baselines.

    python -m bench.producers grpc       # bare grpc.aio server-streaming RPC ("wire ceiling")
    python -m bench.producers grpcfile DIR  # the same, sending the bytes of DIR's shard files
    python -m bench.producers tcp        # raw TCP loopback sender

Each listens on 127.0.0.1 port 0, prints `serving 127.0.0.1:PORT` and serves until
killed. A request is 16 bytes: (total bytes, message bytes), little-endian u64; the
reply is `total` bytes sent as messages of `message` bytes: from one preallocated buffer
(grpc, tcp: the same zero-filled memory again and again, always in the CPU's caches), or
read from the shard files into a new `bytes` each (grpcfile: what the simplest gRPC
server of files does, one copy from the page cache per message; the floor for a worker
that serves stored records). A grpcfile request may carry a third u64, the offset in
the files (taken one after the other) to start from: a read of a range, as a loader's
reads are. `zmq_producer` is the body of one ZeroMQ PUSH process
(forked by the consumer).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

REQUEST = struct.Struct("<QQ")
RANGE_REQUEST = struct.Struct("<QQQ")  # grpcfile: (total, message, offset in the files)
GRPC_METHOD = "/bench.Wire/Stream"
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


# gRPC --------------------------------------------------------------------------------


async def _grpc_serve(files: list[Path] | None = None) -> None:
    import grpc

    async def stream(request: bytes, context: Any) -> Any:
        total, size = REQUEST.unpack(request)
        message = bytes(size)  # preallocated once, sent again and again
        sent = 0
        while sent < total:
            n = min(size, total - sent)
            yield message if n == size else message[:n]
            sent += n

    async def stream_files(request: bytes, context: Any) -> Any:
        if len(request) == RANGE_REQUEST.size:
            total, size, skip = RANGE_REQUEST.unpack(request)
        else:
            (total, size), skip = REQUEST.unpack(request), 0
        assert files
        sent = 0
        while sent < total:  # the files in turn, again from the first if need be
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                try:
                    end = os.fstat(fd).st_size
                    at, skip = min(skip, end), max(0, skip - end)
                    while at < end and sent < total:
                        message = os.pread(fd, min(size, end - at, total - sent), at)
                        at += len(message)
                        sent += len(message)
                        yield message
                finally:
                    os.close(fd)

    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Wire",
        {"Stream": grpc.unary_stream_rpc_method_handler(stream if files is None else stream_files)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


# TCP ---------------------------------------------------------------------------------


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return buf


def _tcp_serve() -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    print(f"serving 127.0.0.1:{lsock.getsockname()[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = lsock.accept()
        with conn:
            total, size = REQUEST.unpack(_recv_exact(conn, REQUEST.size))
            message = memoryview(bytes(size))
            sent = 0
            while sent < total:
                n = min(size, total - sent)
                conn.sendall(message[:n])
                sent += n


# ZeroMQ ------------------------------------------------------------------------------

DONE = b"DONE"


def zmq_producer(address: str, paths: list[str], batch_size: int, work: int, hwm: int) -> None:
    """tensorpack-MultiProcessRunnerZMQ style: read my shards (np.load), cut batches,
    apply the work, PUSH each batch as pickle protocol 5 with out-of-band buffers."""
    import numpy as np
    import zmq

    from bench.common import die_with_parent, vm_hwm_bytes
    from bench.work_decoder import apply_work

    die_with_parent()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.set_hwm(hwm)
    sock.connect(address)
    try:
        for path in paths:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            n = len(arrays["id"])
            for start in range(0, n, batch_size):
                batch = {k: v[start : start + batch_size] for k, v in arrays.items()}
                batch["image"] = apply_work(batch["image"], work)
                buffers: list[pickle.PickleBuffer] = []
                header = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
                sock.send_multipart([header, *(b.raw() for b in buffers)], copy=False)
        # End: this producer's own peak RSS and CPU, which its parent cannot read after exit.
        usage = {"pid": os.getpid(), "hwm": vm_hwm_bytes(os.getpid())}
        sock.send_multipart([DONE, pickle.dumps(usage)])
    finally:
        sock.close(linger=-1)
        ctx.term()


def main() -> None:
    from bench.common import die_with_parent

    die_with_parent()
    kind = sys.argv[1]
    if kind in ("grpc", "grpcfile"):
        files = sorted(Path(sys.argv[2]).glob("*.npz")) if kind == "grpcfile" else None
        try:
            import uvloop

            uvloop.run(_grpc_serve(files))
        except ImportError:  # pragma: no cover
            asyncio.run(_grpc_serve(files))
    elif kind == "tcp":
        _tcp_serve()
    else:
        raise SystemExit(f"unknown producer {kind!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
