"""The worker's transport security: TLS, mTLS and a bearer token.

    security = ServerSecurity(tls_cert=..., tls_key=..., auth_token_file=...)
    loaded = security.load()                        # reads every file once
    server = grpc.aio.server(interceptors=loaded.interceptors(), options=...)
    creds = loaded.credentials()                    # None: serve without TLS
    port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)

With `tls_client_ca` set, clients must present a certificate signed by that CA
(mTLS). With `auth_token_file` set, every RPC must carry the metadata
`authorization: Bearer <token>`, except the standard health service, which
stays open so load balancers and probes can reach it. Without TLS the token
travels in clear text: use both together outside a trusted network.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shardstream._common.pem import read_pem, read_token_file
from shardstream.server._status import LogLimit

__all__ = ["BearerTokenInterceptor", "LoadedServerSecurity", "RequestGuard", "ServerSecurity"]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_MISSING = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
_WRONG = "wrong bearer token"


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
        """Read every configured file once; a ValueError names any file that is unusable."""
        cert = key = client_ca = None
        if self.tls_cert is not None and self.tls_key is not None:
            cert = read_pem(self.tls_cert, "TLS certificate (tls_cert)")
            key = read_pem(self.tls_key, "TLS private key (tls_key)")
        if self.tls_client_ca is not None:
            client_ca = read_pem(self.tls_client_ca, "client CA (tls_client_ca)")
        token = None
        if self.auth_token_file is not None:
            token = read_token_file(self.auth_token_file)
        return LoadedServerSecurity(cert=cert, key=key, client_ca=client_ca, token=token)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedServerSecurity:
    """The contents of a `ServerSecurity`'s files, ready to configure a server."""

    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = None
    token: str | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for `add_secure_port`; None means serve without TLS."""
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors for `grpc.aio.server(interceptors=...)`; empty without a token."""
        return [] if self.token is None else [BearerTokenInterceptor(self.token)]


def _digest(value: bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison constant-time in the length too.
    return hashlib.sha256(value).digest()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Fails every RPC but health checks with UNAUTHENTICATED unless it carries the token.

    The token is never logged nor echoed back in a status message.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must be non-empty")
        self._expected = _digest(token.encode("ascii"))
        self._refusals = LogLimit(logging.getLogger("shardstream.worker"))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        problem = self._check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        self._refusals.log(logging.WARNING, "UNAUTHENTICATED", "refused %s: %s", method, problem)
        return _rejecting_handler(handler, problem)

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
        if not hmac.compare_digest(_digest(presented.strip()), self._expected):
            return _WRONG
        return None


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
        self._refusals = LogLimit(logging.getLogger("shardstream.worker"))

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
