"""Certificate and token rotation: a worker process rereads its TLS files and its token
file when they change, without a restart; files it cannot use leave the old ones in force.

Each check opens a new connection (a local subchannel pool: nothing shared with earlier
channels), so it sees what the worker's next TLS handshake presents.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardstream.client import Loader
from shardstream.client._security import ClientSecurity, call_metadata, secure_channel
from shardstream.client._wire import WorkerStub
from shardstream.server._process import WorkerProcess

from conftest import worker_processes
from tls_certs import Certs, make_certs

NEW_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Certs, Certs]:
    """Two unrelated sets: CA A with its server and client certificates, and CA B."""
    root = tmp_path_factory.mktemp("rotation")
    return make_certs(root / "a"), make_certs(root / "b")


def install(source: Path | bytes, target: Path) -> None:
    """Replace `target` at once, as a rotation does (write aside, then rename)."""
    aside = target.with_name(f".{target.name}.new")
    if isinstance(source, bytes):
        aside.write_bytes(source)
    else:
        shutil.copyfile(source, aside)
    os.replace(aside, target)


@contextlib.asynccontextmanager
async def connection(
    address: str, security: ClientSecurity | None
) -> AsyncIterator[grpc.aio.Channel]:
    async with secure_channel(address, NEW_CONNECTION, security) as channel:
        yield channel


async def health(channel: grpc.aio.Channel) -> str:
    """'ok', or the code the health check failed with (UNAVAILABLE: no TLS handshake)."""
    try:
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "ok"


async def connect(address: str, security: ClientSecurity) -> str:
    """`health` on a new connection."""
    async with connection(address, security) as channel:
        return await health(channel)


async def describe(channel: grpc.aio.Channel, security: ClientSecurity) -> str:
    """'ok', or the code DescribeDataset failed with (UNAUTHENTICATED: the token)."""
    stub = WorkerStub(channel, call_metadata(security))
    try:
        await stub.describe("train", timeout=TIMEOUT, wait_for_ready=False)
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "ok"


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.05)


def logged(worker: WorkerProcess, text: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(text in line for line in list(worker.log))

    return check


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
async def test_rotated_certificates_serve_new_connections_without_a_restart(
    npz_root: Path, tmp_path: Path, cas: tuple[Certs, Certs], mtls: bool
) -> None:
    a, b = cas
    cert, key, client_ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "clients.crt"
    install(a.server_cert, cert)
    install(a.server_key, key)
    install(a.ca_cert, client_ca)
    flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    flags += ["--tls-client-ca", str(client_ca)] if mtls else []

    def trusting(ca: Certs, client: Certs) -> ClientSecurity:
        """A client trusting only `ca`, with `client`'s certificate under mTLS."""
        if not mtls:
            return ClientSecurity(tls_ca=ca.ca_cert)
        return ClientSecurity(tls_ca=ca.ca_cert, tls_cert=client.client_cert,
                              tls_key=client.client_key)  # fmt: skip

    with worker_processes(npz_root, 1, *flags) as (worker,):
        address = worker.address
        async with connection(address, trusting(a, a)) as before:
            assert await health(before) == "ok"
            assert await connect(address, trusting(b, b)) == "UNAVAILABLE"

            install(b.server_cert, cert)
            install(b.server_key, key)
            install(b.ca_cert, client_ca)
            assert await connect(address, trusting(b, b)) == "ok"
            assert await connect(address, trusting(a, a)) == "UNAVAILABLE"
            if mtls:  # the client CA was rotated too: A's client certificate is refused
                assert await connect(address, trusting(b, a)) == "UNAVAILABLE"
            # A connection made before the rotation keeps its session.
            assert await health(before) == "ok"
        assert worker.proc.poll() is None  # the same process all along
    assert any("the TLS files changed: new connections get the new certificate" in line
               for line in worker.log)  # fmt: skip


async def test_unusable_new_tls_files_keep_the_old_certificate(
    npz_root: Path, tmp_path: Path, cas: tuple[Certs, Certs]
) -> None:
    a, b = cas
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(a.server_cert, cert)
    install(a.server_key, key)
    with worker_processes(npz_root, 1, "--tls-cert", str(cert), "--tls-key", str(key)) as (worker,):
        address = worker.address
        trusts_a, trusts_b = ClientSecurity(tls_ca=a.ca_cert), ClientSecurity(tls_ca=b.ca_cert)

        install(b.server_key, key)  # the key replaced first: it is not the certificate's
        assert await connect(address, trusts_a) == "ok"
        await eventually(logged(worker, "do not match: the key is not the certificate's"),
                         "the mismatch logged")  # fmt: skip
        half = b.server_cert.read_bytes()
        install(half[: len(half) // 2], cert)  # a certificate cut short
        assert await connect(address, trusts_a) == "ok"
        assert await connect(address, trusts_b) == "UNAVAILABLE"
        await eventually(logged(worker, "cannot be loaded"), "the cut certificate logged")

        install(b.server_cert, cert)  # the rotation completes
        assert await connect(address, trusts_b) == "ok"
        assert await connect(address, trusts_a) == "UNAVAILABLE"
        assert worker.proc.poll() is None


async def test_rotated_token_file_is_required_without_a_restart(
    npz_root: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    install(b"old-token\n", token)
    old, new = ClientSecurity(auth_token="old-token"), ClientSecurity(auth_token="new-token")
    with worker_processes(npz_root, 1, "--auth-token-file", str(token)) as (worker,):
        async with connection(worker.address, None) as channel:
            assert await describe(channel, old) == "ok"
            assert await describe(channel, new) == "UNAUTHENTICATED"

            install(b"new-token\n", token)

            async def old_refused() -> bool:
                return await describe(channel, old) == "UNAUTHENTICATED"

            await eventually(old_refused, "the old token refused")
            assert await describe(channel, new) == "ok"

            token.write_bytes(b"")  # emptied in place, as a half-done write leaves it
            seen = logged(worker, "the bearer token file changed but cannot be used")

            async def kept_and_logged() -> bool:  # calls make the worker look at the file
                assert await describe(channel, new) == "ok"
                return await seen()

            await eventually(kept_and_logged, "the empty token file logged")
            assert await describe(channel, new) == "ok"
            assert await describe(channel, old) == "UNAUTHENTICATED"
            assert await health(channel) == "ok"  # health never needs the token
        assert worker.proc.poll() is None
    assert not any("new-token" in line or "old-token" in line for line in worker.log)


async def test_a_running_loader_follows_a_token_changeover_without_a_refusal(
    npz_root: Path, tmp_path: Path
) -> None:
    """The changeover a token file with several tokens allows: the worker accepts old
    and new, the loader's file switches to the new one (the running loader sends it from
    then on), the worker drops the old one; the loader never sees a refusal and its
    epochs stay whole."""
    worker_file, client_file = tmp_path / "worker-tokens", tmp_path / "client-token"
    install(b"old-token\n", worker_file)
    install(b"old-token\n", client_file)
    security = ClientSecurity(auth_token_file=client_file)
    old = ClientSecurity(auth_token="old-token")
    with worker_processes(npz_root, 1, "--auth-token-file", str(worker_file)) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=50,
                          security=security) as loader:  # fmt: skip
            total = loader.dataset.total_records
            ids = [b["id"] async for b in loader.epoch(0)]
            install(b"new-token\nold-token\n", worker_file)  # both accepted
            install(b"new-token\n", client_file)
            epoch = loader.epoch(1)
            ids1 = [(await anext(epoch))["id"]]
            async with connection(worker.address, None) as channel:

                async def new_sent() -> bool:  # the loader's calls carry the new token
                    return loader._pool._metadata() == (("authorization", "Bearer new-token"),)

                await eventually(new_sent, "the loader sending the new token")
                install(b"new-token\n", worker_file)  # the old one dropped

                async def old_refused() -> bool:
                    return await describe(channel, old) == "UNAUTHENTICATED"

                await eventually(old_refused, "the old token refused")
            ids1 += [b["id"] async for b in epoch]
            ids2 = [b["id"] async for b in loader.epoch(2)]
        for epoch_ids in (ids, ids1, ids2):
            assert sorted(np.concatenate(epoch_ids).tolist()) == list(range(total))
        assert worker.proc.poll() is None
