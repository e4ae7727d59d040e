"""TLS, mTLS and the bearer token through the real worker and loader, and the CLI probes."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client._security import ClientSecurity
from shardstream.client.errors import AccessDeniedError, WorkersUnavailableError
from shardstream.server._security import ServerSecurity

from conftest import RECORDS, collect_epoch, ids_of, running_workers
from tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text("s3cret-token\n")
    return path


def server_security(certs: Certs, token_file: Path) -> ServerSecurity:
    return ServerSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key,
                          tls_client_ca=certs.ca_cert, auth_token_file=token_file)  # fmt: skip


async def test_mtls_and_token_end_to_end(npz_root: Path, certs: Certs, token_file: Path) -> None:
    good = ClientSecurity(tls_ca=certs.ca_cert, tls_cert=certs.client_cert,
                          tls_key=certs.client_key, auth_token_file=token_file)  # fmt: skip
    async with running_workers(npz_root, 2, security=server_security(certs, token_file)) as ws:
        addresses = [w.address for w in ws]
        async with Loader(addresses, dataset="train", batch_size=100, security=good) as loader:
            ids = ids_of(await collect_epoch(loader, 0))
        assert np.array_equal(ids, np.arange(RECORDS))

        wrong_token = ClientSecurity(tls_ca=certs.ca_cert, tls_cert=certs.client_cert,
                                     tls_key=certs.client_key, auth_token="nope")  # fmt: skip
        with pytest.raises(AccessDeniedError, match="wrong bearer token"):
            async with Loader(addresses, dataset="train", batch_size=8, security=wrong_token):
                pass
        no_token = ClientSecurity(tls_ca=certs.ca_cert, tls_cert=certs.client_cert,
                                  tls_key=certs.client_key)  # fmt: skip
        with pytest.raises(AccessDeniedError, match="missing bearer token"):
            async with Loader(addresses, dataset="train", batch_size=8, security=no_token):
                pass
        for bad in (
            ClientSecurity(tls_ca=certs.other_ca_cert, tls_cert=certs.client_cert,
                           tls_key=certs.client_key, auth_token_file=token_file),  # wrong CA
            ClientSecurity(tls_ca=certs.ca_cert, auth_token_file=token_file),  # no client cert
            ClientSecurity(tls_ca=certs.ca_cert, tls_cert=certs.other_client_cert,
                           tls_key=certs.other_client_key, auth_token_file=token_file),
            None,  # plaintext against a TLS worker
        ):  # fmt: skip
            with pytest.raises(WorkersUnavailableError, match="UNAVAILABLE"):
                async with Loader(addresses, dataset="train", batch_size=8, security=bad,
                                  describe_timeout=1):  # fmt: skip
                    pass

        # The health probe needs TLS (and the client certificate under mTLS), never the token.
        async def probe(*extra: str) -> subprocess.CompletedProcess[str]:
            # In a thread: the workers run on this test's event loop.
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "shardstream.cli", "health", addresses[0],
                 "--timeout", "5", *extra],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        ok = await probe("--tls-ca", str(certs.ca_cert), "--tls-cert", str(certs.client_cert),
                   "--tls-key", str(certs.client_key))  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
        refused = await probe("--tls-ca", str(certs.other_ca_cert))
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


async def test_token_without_tls_and_inspect(npz_root: Path, token_file: Path) -> None:
    security = ServerSecurity(auth_token_file=token_file)
    async with running_workers(npz_root, 1, security=security) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=500,
                          security=ClientSecurity(auth_token="s3cret-token")) as loader:  # fmt: skip
            assert len(await collect_epoch(loader, 0)) == RECORDS // 500

        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "shardstream.cli", *args],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        assert (
            await cli("health", worker.address)
        ).returncode == 0  # health is exempt from the token
        denied = await cli("inspect", worker.address)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        shown = await cli("inspect", worker.address, "--auth-token-file", str(token_file))
        assert shown.returncode == 0 and "dataset train" in shown.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_metrics_open_beside_a_guarded_worker_are_warned_about(
    npz_root: Path, token_file: Path, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The metrics endpoint has neither TLS nor token: beside a worker that asks for them
    on a non-loopback address, it used to show dataset names to anyone, silently."""
    security = ServerSecurity(auth_token_file=token_file)
    with caplog.at_level(logging.WARNING, "shardstream"):
        async with running_workers(npz_root, 1, security=security, host=host, metrics_port=0):
            pass
    warned = [r for r in caplog.records if "served without the TLS or token" in r.getMessage()]
    assert len(warned) == (host == "0.0.0.0")


def test_worker_cli_refuses_half_a_tls_configuration(tmp_path: Path, certs: Certs) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "shardstream.server", "--data-root", str(tmp_path),
         "--dataset", "train=*.npz", "--tls-cert", str(certs.server_cert)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--tls-key" in r.stderr
