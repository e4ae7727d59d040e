"""TLS, mTLS and bearer tokens between real grpc.aio servers and clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardstream._common.pem import read_token_file
from shardstream._common.watched import WatchedFiles
from shardstream.client._security import ClientSecurity, call_metadata, secure_channel
from shardstream.server._security import ServerSecurity

from tls_certs import Certs, make_certs

TOKEN = "s3cret-token_0123456789"
ECHO = "/test.Echo/Echo"
REPEAT = "/test.Echo/Repeat"
TIMEOUT = 5.0


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(f"  {TOKEN}\n")  # surrounding whitespace is stripped
    return path


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _repeat(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


@contextlib.asynccontextmanager
async def serving(security: ServerSecurity) -> AsyncIterator[int]:
    """A server with the test service and a SERVING health service; yields its port."""
    loaded = security.load()
    server = grpc.aio.server(interceptors=loaded.interceptors())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(_echo),
                    "Repeat": grpc.unary_stream_rpc_method_handler(_repeat),
                },
            ),
        )
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    credentials = loaded.credentials()
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port != 0
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def channel_to(port: int, security: ClientSecurity | None) -> AsyncIterator[grpc.aio.Channel]:
    channel = secure_channel(f"127.0.0.1:{port}", [], security)
    try:
        yield channel
    finally:
        await channel.close()


async def echo(channel: grpc.aio.Channel, security: ClientSecurity | None = None) -> bytes:
    call = channel.unary_unary(ECHO)
    reply: bytes = await call(b"ping", metadata=call_metadata(security), timeout=TIMEOUT)
    return reply


async def repeat(channel: grpc.aio.Channel, security: ClientSecurity | None = None) -> list[bytes]:
    call = channel.unary_stream(REPEAT)(b"hi", metadata=call_metadata(security), timeout=TIMEOUT)
    return [reply async for reply in call]


async def check_health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    status: int = reply.status
    return status


async def expect_code(
    code: grpc.StatusCode, channel: grpc.aio.Channel, security: ClientSecurity | None = None
) -> str:
    """Both method kinds fail with `code`; returns the unary call's details."""
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await echo(channel, security)
    assert unary.value.code() == code, unary.value
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        await repeat(channel, security)
    assert stream.value.code() == code, stream.value
    return str(unary.value.details())


# -- TLS ---------------------------------------------------------------------------------------


def tls_server(certs: Certs, **kw: object) -> ServerSecurity:
    return ServerSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key, **kw)  # type: ignore[arg-type]


async def test_tls_with_the_right_ca(certs: Certs) -> None:
    async with serving(tls_server(certs)) as port:
        for name in (None, "localhost"):  # the cert names 127.0.0.1 too; the override works
            security = ClientSecurity(tls_ca=certs.ca_cert, tls_server_name=name)
            assert security.tls
            async with channel_to(port, security) as channel:
                assert await echo(channel) == b"ping"
                assert await repeat(channel) == [b"hi"] * 3
                assert await check_health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_tls_with_the_wrong_ca_fails(certs: Certs) -> None:
    async with serving(tls_server(certs)) as port:
        async with channel_to(port, ClientSecurity(tls_ca=certs.other_ca_cert)) as channel:
            details = await expect_code(grpc.StatusCode.UNAVAILABLE, channel)
            assert "handshake failed" in details.lower()


async def test_tls_with_the_wrong_server_name_fails(certs: Certs) -> None:
    async with serving(tls_server(certs)) as port:
        security = ClientSecurity(tls_ca=certs.ca_cert, tls_server_name="not-the-server.example")
        async with channel_to(port, security) as channel:
            await expect_code(grpc.StatusCode.UNAVAILABLE, channel)


async def test_plain_client_cannot_talk_to_a_tls_server(certs: Certs) -> None:
    async with serving(tls_server(certs)) as port, channel_to(port, None) as channel:
        await expect_code(grpc.StatusCode.UNAVAILABLE, channel)


# -- mTLS --------------------------------------------------------------------------------------


async def test_mtls(certs: Certs) -> None:
    async with serving(tls_server(certs, tls_client_ca=certs.ca_cert)) as port:
        good = ClientSecurity(
            tls_ca=certs.ca_cert, tls_cert=certs.client_cert, tls_key=certs.client_key
        )
        async with channel_to(port, good) as channel:
            assert await echo(channel) == b"ping"
            assert await repeat(channel) == [b"hi"] * 3
        no_cert = ClientSecurity(tls_ca=certs.ca_cert)
        async with channel_to(port, no_cert) as channel:
            await expect_code(grpc.StatusCode.UNAVAILABLE, channel)
        wrong_ca = ClientSecurity(
            tls_ca=certs.ca_cert, tls_cert=certs.other_client_cert, tls_key=certs.other_client_key
        )
        async with channel_to(port, wrong_ca) as channel:
            await expect_code(grpc.StatusCode.UNAVAILABLE, channel)


# -- bearer token ------------------------------------------------------------------------------


async def test_token(token_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(ServerSecurity(auth_token_file=token_file)) as port:
        async with channel_to(port, None) as channel:
            right = ClientSecurity(auth_token_file=token_file)
            assert call_metadata(right) == (("authorization", f"Bearer {TOKEN}"),)
            assert await echo(channel, right) == b"ping"
            assert await repeat(channel, right) == [b"hi"] * 3
            assert await echo(channel, ClientSecurity(auth_token=TOKEN)) == b"ping"

            details = await expect_code(grpc.StatusCode.UNAUTHENTICATED, channel)
            assert "missing bearer token" in details
            wrong = ClientSecurity(auth_token=TOKEN + "x")
            details = await expect_code(grpc.StatusCode.UNAUTHENTICATED, channel, wrong)
            assert details == "wrong bearer token"
            # Health stays open for probes, without a token.
            assert await check_health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert TOKEN not in caplog.text
    assert "refused /test.Echo/Echo" in caplog.text


async def test_token_scheme_and_duplicates(token_file: Path) -> None:
    async with serving(ServerSecurity(auth_token_file=token_file)) as port:
        async with channel_to(port, None) as channel:
            call = channel.unary_unary(ECHO)
            assert await call(b"a", metadata=(("authorization", f"bearer {TOKEN}"),)) == b"a"
            for metadata in (
                (("authorization", TOKEN),),
                (("authorization", f"Basic {TOKEN}"),),
                (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(b"a", metadata=metadata, timeout=TIMEOUT)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert TOKEN not in str(err.value.details())


async def test_token_and_mtls_together(certs: Certs, token_file: Path) -> None:
    server = tls_server(certs, tls_client_ca=certs.ca_cert, auth_token_file=token_file)
    async with serving(server) as port:
        tls = {"tls_ca": certs.ca_cert, "tls_cert": certs.client_cert, "tls_key": certs.client_key}
        right = ClientSecurity(auth_token=TOKEN, **tls)  # type: ignore[arg-type]
        async with channel_to(port, right) as channel:
            assert await echo(channel, right) == b"ping"
            assert await repeat(channel, right) == [b"hi"] * 3
            assert await check_health(channel) == health_pb2.HealthCheckResponse.SERVING
            details = await expect_code(grpc.StatusCode.UNAUTHENTICATED, channel)
            assert "missing bearer token" in details


# -- configuration -----------------------------------------------------------------------------


@contextlib.contextmanager
def raises(*fragments: str) -> Iterator[None]:
    with pytest.raises(ValueError) as err:
        yield
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_server_config_validation(tmp_path: Path, certs: Certs) -> None:
    with raises("tls_cert and tls_key"):
        ServerSecurity(tls_cert=certs.server_cert)
    with raises("tls_cert and tls_key"):
        ServerSecurity(tls_key=certs.server_key)
    with raises("tls_client_ca", "tls_cert"):
        ServerSecurity(tls_client_ca=certs.ca_cert)
    missing = tmp_path / "nope.pem"
    with raises(str(missing), "does not exist"):
        ServerSecurity(tls_cert=missing, tls_key=certs.server_key).load()
    with raises(str(tmp_path / "token"), "does not exist"):
        ServerSecurity(auth_token_file=tmp_path / "token").load()
    (tmp_path / "empty").write_text(" \n")
    with raises(str(tmp_path / "empty"), "empty"):
        ServerSecurity(auth_token_file=tmp_path / "empty").load()
    (tmp_path / "spaced").write_text("two words\n")
    with raises(str(tmp_path / "spaced"), "printable ASCII"):
        ServerSecurity(auth_token_file=tmp_path / "spaced").load()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with raises(str(tmp_path / "junk.pem"), "not PEM"):
        ServerSecurity(tls_cert=tmp_path / "junk.pem", tls_key=certs.server_key).load()
    loaded = ServerSecurity().load()
    assert loaded.credentials() is None
    assert loaded.interceptors() == []


def test_loaded_server_security_hides_secrets(certs: Certs, token_file: Path) -> None:
    loaded = tls_server(certs, auth_token_file=token_file).load()
    assert loaded.tokens == (TOKEN,)
    text = repr(loaded)
    assert TOKEN not in text
    assert "PRIVATE KEY" not in text
    assert loaded.credentials() is not None
    assert len(loaded.interceptors()) == 1


def test_client_config_validation(tmp_path: Path, certs: Certs) -> None:
    with raises("tls_cert and tls_key"):
        ClientSecurity(tls_cert=certs.client_cert)
    with raises("auth_token or auth_token_file, not both"):
        ClientSecurity(auth_token=TOKEN, auth_token_file=tmp_path / "token")
    with raises("auth_token", "empty"):
        ClientSecurity(auth_token=" ")
    assert TOKEN not in repr(ClientSecurity(auth_token=TOKEN))
    # paths as the README writes them, strings: read as paths (were an AttributeError)
    as_text = ClientSecurity(tls_ca=str(certs.ca_cert), auth_token_file=str(tmp_path / "t"))
    assert as_text.tls_ca == certs.ca_cert and as_text.auth_token_file == tmp_path / "t"
    with pytest.raises(TypeError, match="tls_ca must be a path"):
        ClientSecurity(tls_ca=b"ca.pem")  # type: ignore[arg-type]
    assert not ClientSecurity().tls
    assert ClientSecurity(tls_cert=certs.client_cert, tls_key=certs.client_key).tls
    assert call_metadata(None) == ()
    assert call_metadata(ClientSecurity(tls=True)) == ()
    missing = tmp_path / "ca.pem"
    with raises(str(missing), "does not exist"):
        secure_channel("127.0.0.1:1", [], ClientSecurity(tls_ca=missing))
    with raises(str(tmp_path / "token"), "does not exist"):
        call_metadata(ClientSecurity(auth_token_file=tmp_path / "token"))


def test_load_checks_the_tls_files_as_tls_uses_them(tmp_path: Path, certs: Certs) -> None:
    with raises(str(certs.server_cert), str(certs.other_client_key), "do not match"):
        ServerSecurity(tls_cert=certs.server_cert, tls_key=certs.other_client_key).load()
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(certs.server_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True)  # fmt: skip
    with raises(str(encrypted), "encrypted", "unencrypted key"):
        ServerSecurity(tls_cert=certs.server_cert, tls_key=encrypted).load()
    junk_ca = tmp_path / "junk-ca.pem"
    junk_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with raises(str(junk_ca), "holds no usable certificate"):
        tls_server(certs, tls_client_ca=junk_ca).load()


async def test_a_client_checks_its_tls_files_as_tls_uses_them(certs: Certs) -> None:
    """A private key given as the CA bundle, or a client key that is not the client
    certificate's, read as the worker being unreachable ("Failed to create security
    handshaker", UNAVAILABLE); now the file is named at once, as on the worker."""
    with raises(str(certs.server_key), "CA bundle (tls_ca)", "holds no usable certificate"):
        secure_channel("127.0.0.1:1", [], ClientSecurity(tls_ca=certs.server_key))
    mismatched = ClientSecurity(
        tls_ca=certs.ca_cert, tls_cert=certs.client_cert, tls_key=certs.other_client_key
    )
    with raises(str(certs.client_cert), str(certs.other_client_key), "do not match"):
        secure_channel("127.0.0.1:1", [], mismatched)


async def test_a_client_takes_every_valid_tls_file(tmp_path: Path, certs: Certs) -> None:
    """What the checks above must not refuse: a CA bundle with UTF-8 comments between its
    certificates (certifi's layout; it was a bare TypeError), and a client key that
    OpenSSL's default security level calls too small (gRPC judges key sizes itself)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Issuer: CN=Főtanúsítvány\n".encode() + certs.ca_cert.read_bytes() * 2)
    key, cert = tmp_path / "small.key", tmp_path / "small.crt"
    await asyncio.to_thread(
        subprocess.run,
        ["openssl", "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-days", "1",
         "-subj", "/CN=small", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    channel = secure_channel(
        "127.0.0.1:1", [], ClientSecurity(tls_ca=bundle, tls_cert=cert, tls_key=key)
    )
    await channel.close()


def test_watched_files_take_up_changes_and_keep_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "shardstream.worker")
    path = tmp_path / "token"
    path.write_text("one\n")
    log = logging.getLogger("shardstream.worker")
    watched = WatchedFiles(
        (path,), lambda: read_token_file(path), what="token file", applied="calls need it", log=log
    )
    assert (watched.value, watched.refresh()) == ("one", 0)
    aside = tmp_path / "token.new"
    aside.write_text("two\n")
    aside.replace(path)
    assert (watched.refresh(), watched.value) == (1, "two")
    assert "the token file changed: calls need it" in caplog.text
    path.write_text("")  # unusable: logged once, the last good token stays
    assert (watched.refresh(), watched.refresh(), watched.value) == (1, 1, "two")
    assert caplog.text.count("changed but cannot be used") == 1
    assert "is empty" in caplog.text
    path.write_text("three")  # rewritten in place: the size and time differ
    assert (watched.refresh(), watched.value) == (2, "three")
    path.unlink()
    assert (watched.refresh(), watched.value) == (2, "three")
    assert "does not exist" in caplog.text
    with raises(str(path), "does not exist"):
        WatchedFiles((path,), lambda: read_token_file(path), what="token file", applied="", log=log)


def test_what_weakens_the_security_is_said_at_start(tmp_path: Path, certs: Certs) -> None:
    """Secrets other users can read, a guessable token and a token sent in clear text to
    a worker listening beyond loopback are each named, with the fix; a good set-up: none."""
    from shardstream.server._security import security_warnings

    token = tmp_path / "token"
    token.write_text("abc\n" + TOKEN + "\n")
    token.chmod(0o644)
    key = tmp_path / "server.key"
    key.write_bytes(certs.server_key.read_bytes())
    key.chmod(0o640)
    loose = ServerSecurity(tls_cert=certs.server_cert, tls_key=key, auth_token_file=token)
    said = security_warnings(loose, ("abc", TOKEN), loopback=False)
    assert len(said) == 3, said
    assert f"bearer token file {token} can be read by other users (mode 644)" in said[0]
    assert f"TLS key {key} can be read by other users (mode 640): chmod 600" in said[1]
    assert "bearer token 1 of" in said[2] and "fewer than 16 characters" in said[2]
    clear = ServerSecurity(auth_token_file=token)
    token.chmod(0o600)
    assert security_warnings(clear, (TOKEN,), loopback=True) == []
    (said,) = security_warnings(clear, (TOKEN,), loopback=False)
    assert "clear text" in said and "--tls-cert" in said
    key.chmod(0o600)
    tight = ServerSecurity(tls_cert=certs.server_cert, tls_key=key, auth_token_file=token)
    assert security_warnings(tight, (TOKEN,), loopback=False) == []


async def test_a_worker_logs_what_weakens_its_security(
    npz_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import running_workers

    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o604)
    with caplog.at_level(logging.WARNING, logger="shardstream.worker"):
        async with running_workers(npz_root, 1, security=ServerSecurity(auth_token_file=token)):
            pass
    said = [r.getMessage() for r in caplog.records]
    assert any("can be read by other users (mode 604)" in m for m in said), said
    assert any("fewer than 16 characters" in m for m in said), said
