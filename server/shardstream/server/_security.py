"""The worker's transport security: TLS, mTLS and a bearer token.

    security = ServerSecurity(tls_cert=..., tls_key=..., auth_token_file=...)
    loaded = security.load()                        # reads the files (and watches them)
    server = grpc.aio.server(interceptors=loaded.interceptors(), options=...)
    creds = loaded.credentials()                    # None: serve without TLS
    port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)

With `tls_client_ca` set, clients must present a certificate signed by that CA
(mTLS). With `auth_token_file` set, every RPC must carry the metadata
`authorization: Bearer <token>`, except the standard health service, which
stays open so load balancers and probes can reach it. Without TLS the token
travels in clear text: use both together outside a trusted network.

The files are reread when they change, without a restart (certificate rotation):
the certificate, key and client CA before each new connection's TLS handshake
(connections already open keep theirs), the token file at most once a second.
A change is seen by the files' stats (inode, size, modification time), so
replacing a file (`os.replace`, `mv`, a Kubernetes secret update) and
rewriting it both count. New files that cannot be used (half written, a key
that is not the certificate's, no PEM) are logged and the previous ones stay
in use until the files are fixed.

The token is checked before anything else reads the request: a refused call's
bytes are never decoded, and refusals are logged a few lines a second at most.
`RequestGuard` (always installed, after the token) gives request bytes that do
not parse INVALID_ARGUMENT in one line, also for services whose handlers let
gRPC decode their requests (health), where gRPC would log a traceback and
answer UNKNOWN.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from shardstream._common.pem import check_ca, check_key_pair, read_pem, read_tokens_file
from shardstream._common.watched import WatchedFiles
from shardstream.server._status import LogLimit

__all__ = [
    "BearerTokenInterceptor",
    "LoadedServerSecurity",
    "RequestGuard",
    "ServerSecurity",
    "WatchedFiles",
]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_MISSING = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
_WRONG = "wrong bearer token"
TOKEN_RECHECK_SECONDS = 1.0  # the token file's stats are looked at most this often

log = logging.getLogger("shardstream.worker")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerSecurity:
    """Where the worker's TLS files and bearer token live; all off by default."""

    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, turns on TLS
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA bundle; turns on mTLS (client certs required)
    auth_token_file: Path | None = None  # file holding the bearer token clients must send

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "TLS needs both a certificate and its private key: "
                "set tls_cert and tls_key together (--tls-cert and --tls-key), or neither"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "tls_client_ca (mTLS) needs the server's own certificate: "
                "set tls_cert and tls_key as well"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mtls(self) -> bool:
        return self.tls_client_ca is not None

    def load(self) -> LoadedServerSecurity:
        """Read every configured file once, and watch them for changes (`WatchedFiles`);
        a ValueError names any file that is unusable."""
        tls = token = None
        if self.tls_cert is not None and self.tls_key is not None:
            tls = WatchedFiles(
                self._tls_paths(),
                lambda: _read_tls(self),
                what="TLS files",
                applied="new connections get the new certificate",
                log=log,
            )
        if self.auth_token_file is not None:
            path = self.auth_token_file
            token = WatchedFiles(
                (path,),
                lambda: read_tokens_file(path),
                what="bearer token file",
                applied="calls need one of its tokens",
                log=log,
            )
        return LoadedServerSecurity(
            cert=None if tls is None else tls.value.cert,
            key=None if tls is None else tls.value.key,
            client_ca=None if tls is None else tls.value.client_ca,
            tokens=None if token is None else token.value,
            tls_files=tls,
            token_file=token,
        )

    def _tls_paths(self) -> tuple[Path, ...]:
        given = (self.tls_cert, self.tls_key, self.tls_client_ca)
        return tuple(p for p in given if p is not None)


class _Tls(NamedTuple):
    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read_tls(security: ServerSecurity) -> _Tls:
    """The certificate, key and client CA, checked as TLS would use them: the key is the
    certificate's, the CA bundle holds certificates (ValueError naming the files if not)."""
    assert security.tls_cert is not None and security.tls_key is not None
    cert = read_pem(security.tls_cert, "TLS certificate (tls_cert)")
    key = read_pem(security.tls_key, "TLS private key (tls_key)")
    client_ca = None
    if security.tls_client_ca is not None:
        client_ca = read_pem(security.tls_client_ca, "client CA (tls_client_ca)")
    check_key_pair(security.tls_cert, security.tls_key, "TLS")
    if client_ca is not None and security.tls_client_ca is not None:
        check_ca(client_ca, security.tls_client_ca, "client CA (tls_client_ca)")
    return _Tls(cert, key, client_ca)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedServerSecurity:
    """The contents of a `ServerSecurity`'s files, ready to configure a server; with
    `tls_files` / `token_file` (as `ServerSecurity.load` makes it), the server it
    configures rereads them when they change."""

    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = None
    tokens: tuple[str, ...] | None = field(default=None, repr=False)  # any one is accepted
    tls_files: WatchedFiles[_Tls] | None = field(default=None, repr=False, compare=False)
    token_file: WatchedFiles[tuple[str, ...]] | None = field(
        default=None, repr=False, compare=False
    )

    def credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for `add_secure_port`; None means serve without TLS."""
        if self.cert is None or self.key is None:
            return None
        initial = grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )
        files = self.tls_files
        served = [0 if files is None else files.version]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called before every TLS handshake: None keeps the current configuration.
            if files is None:
                return None
            try:
                version = files.refresh()
            except Exception:  # never fail a handshake over this: keep what is served
                log.exception("rereading the TLS files failed; keeping the current ones")
                return None
            if version == served[0]:
                return None
            served[0] = version
            tls = files.value
            return grpc.ssl_server_certificate_configuration(
                [(tls.key, tls.cert)], root_certificates=tls.client_ca
            )

        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=self.client_ca is not None
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors for `grpc.aio.server(interceptors=...)`; empty without a token."""
        if self.tokens is None:
            return []
        return [BearerTokenInterceptor(self.tokens, file=self.token_file)]


def _digest(value: bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison constant-time in the length too.
    return hashlib.sha256(value).digest()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Fails every RPC but health checks with UNAUTHENTICATED unless it carries the token.

    The token is never logged nor echoed back in a status message.
    """

    def __init__(
        self, tokens: str | Sequence[str], *, file: WatchedFiles[tuple[str, ...]] | None = None
    ) -> None:
        """`tokens`: the one accepted, or several (a changeover: the old and the new);
        `file`: where they came from, reread when it changes (at most once a second)."""
        self._expected = _digests(tokens)
        self._refusals = LogLimit(log)
        self._file = file
        self._version = 0 if file is None else file.version
        self._next_check = time.monotonic() + TOKEN_RECHECK_SECONDS

    def _refresh(self) -> None:
        """Take up a changed token file (a few stat calls a second at most)."""
        now = time.monotonic()
        if self._file is None or now < self._next_check:
            return
        self._next_check = now + TOKEN_RECHECK_SECONDS
        version = self._file.refresh()
        if version != self._version:
            self._version = version
            self._expected = _digests(self._file.value)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        self._refresh()
        problem = self._check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        self._refusals.log(logging.WARNING, "UNAUTHENTICATED", "refused %s: %s", method, problem)
        return _rejecting_handler(handler, problem)

    def accepts(self, metadata: Any) -> bool:
        """Whether a call's metadata carries a valid token (for calls that need none, like
        health, whose limits are looser with one: `_watches`)."""
        self._refresh()
        return self._check(metadata) is None

    def _check(self, metadata: Any) -> str | None:
        """None if the metadata carries the right token, else why not (without the token)."""
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if not values:
            return _MISSING
        if len(values) > 1:
            return "more than one 'authorization' metadata entry: send exactly one"
        value = values[0]
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        scheme, _, presented = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return _MISSING
        given = _digest(presented.strip())
        if not any([hmac.compare_digest(given, expected) for expected in self._expected]):
            return _WRONG  # (every token compared: the time does not say which one matched)
        return None


def _digests(tokens: str | Sequence[str]) -> tuple[bytes, ...]:
    tokens = (tokens,) if isinstance(tokens, str) else tuple(tokens)
    if not tokens or not all(tokens):
        raise ValueError("bearer tokens must be non-empty")
    return tuple(_digest(t.encode("ascii")) for t in tokens)


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails the RPC with UNAUTHENTICATED,
    without decoding its request (no deserializer: gRPC hands over the bytes unread)."""

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(reject, request_deserializer=None, response_serializer=None)


class _Malformed:
    """What a guarded deserializer returns for bytes that do not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers request bytes that do not parse with INVALID_ARGUMENT and a one-line,
    rate-limited log line, where gRPC would log a traceback and answer UNKNOWN."""

    def __init__(self) -> None:
        self._refusals = LogLimit(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # no request to decode here (the Worker's handlers decode their own)
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler
        return _guarded(handler, behavior, handler_call_details.method, self._refusals)


def _guarded(
    handler: grpc.RpcMethodHandler, behavior: Any, method: str, refusals: LogLimit
) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or a deserializer's own error
            return _Malformed(f"the request is not a valid message ({len(data)} bytes): {exc}")

    async def refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
        reason = request.reason[:300]
        refusals.log(logging.WARNING, "INVALID_ARGUMENT", "INVALID_ARGUMENT %s: %s", method, reason)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            async for message in behavior(request, context):
                yield message

        guarded: Any = stream
    else:

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await behavior(request, context)

        guarded = call
    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(
        guarded, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )


SHORT_TOKEN = 16  # a bearer token shorter than this many characters is called guessable


def security_warnings(security: ServerSecurity, tokens: Sequence[str], loopback: bool) -> list[str]:
    """What weakens the configured security, one line each, for the worker to log at
    start: secrets others on the host can read, guessable tokens, tokens sent in clear."""
    found = []
    secrets = [("bearer token file", security.auth_token_file), ("TLS key", security.tls_key)]
    for what, path in secrets:
        if path is None:
            continue
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & 0o077:
            found.append(
                f"the {what} {path} can be read by other users (mode {mode & 0o777:o}): "
                f"chmod 600 {path}"
            )
    short = [n for n, t in enumerate(tokens, 1) if len(t) < SHORT_TOKEN]
    if short:
        found.append(
            f"bearer token {', '.join(map(str, short))} of {security.auth_token_file} has fewer "
            f"than {SHORT_TOKEN} characters and can be guessed: use a random one "
            "(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    if tokens and not security.tls and not loopback:
        found.append(
            "bearer tokens cross the network in clear text (no TLS) to a worker that listens "
            "beyond loopback: anyone who sees the traffic can use them; give --tls-cert and "
            "--tls-key"
        )
    return found
