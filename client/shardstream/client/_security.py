"""The client's transport security: TLS, mTLS client certificates and a bearer token.

    security = ClientSecurity(tls_ca=Path("ca.pem"), auth_token_file=Path("token"))
    channel = secure_channel("worker:50051", options, security)
    metadata = CallMetadata(security)               # once per client
    stub.read(request, metadata=metadata())         # each call: the token file's current token

The token is sent as ordinary call metadata (`authorization: Bearer <token>`),
so it also works on channels without TLS; there it travels in clear text and
anyone on the path can read it. Use TLS wherever the network is not trusted.
A token file is read again when it changes (looked at once a second at most), so
a running loader follows a token rotation (see `read_tokens_file`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# One reader for PEM and token files on both sides, with the same precise errors.
from shardstream._common.pem import check_ca, check_key_pair, read_pem, read_token_file
from shardstream._common.watched import WatchedFiles

__all__ = ["CallMetadata", "ClientSecurity", "call_metadata", "secure_channel"]

log = logging.getLogger("shardstream.client")
TOKEN_RECHECK_SECONDS = 1.0  # a token file's stats are looked at most this often


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientSecurity:
    """How the client reaches workers: plain by default; any TLS setting turns TLS on."""

    tls: bool = False  # TLS, trusting the system roots unless tls_ca is given
    tls_ca: Path | None = None  # PEM CA bundle to trust instead of the system roots
    tls_cert: Path | None = None  # PEM client certificate chain for mTLS; with tls_key
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_server_name: str | None = None  # name checked in the server's certificate
    auth_token: str | None = field(default=None, repr=False)  # bearer token sent with every call
    auth_token_file: Path | None = None  # file holding the bearer token (instead of auth_token)

    def __post_init__(self) -> None:
        for name in ("tls_ca", "tls_cert", "tls_key", "auth_token_file"):
            value = getattr(self, name)
            if isinstance(value, str | os.PathLike):  # "ca.pem" as well as Path("ca.pem")
                object.__setattr__(self, name, Path(value))
            elif value is not None:
                raise TypeError(f"{name} must be a path (str or Path), got {type(value).__name__}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "a client certificate needs its private key: "
                "set tls_cert and tls_key together (--tls-cert and --tls-key), or neither"
            )
        if self.tls_server_name is not None and not self.tls_server_name.strip():
            raise ValueError("tls_server_name must be a non-empty host name, or None")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError(
                "give the bearer token once: set auth_token or auth_token_file, not both"
            )
        if self.auth_token is not None:
            _check_token(self.auth_token.strip(), "auth_token")
        implied = (self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)
        if any(v is not None for v in implied):
            object.__setattr__(self, "tls", True)


# The process in which this client first made a gRPC channel. grpc.aio does not survive
# a fork: in a child forked after it ran, a new channel's calls hang or crash (measured:
# both, with grpc's fork support off and on, also after the parent closed every channel).
_grpc_used_in: int | None = None


def _refuse_forked_child() -> None:
    global _grpc_used_in
    pid = os.getpid()
    if _grpc_used_in is None:
        _grpc_used_in = pid
    elif _grpc_used_in != pid:
        raise RuntimeError(
            f"this process ({pid}) was forked from process {_grpc_used_in} after "
            "shardstream's client used gRPC there, and grpc.aio does not work in a forked "
            "child (its calls hang or crash): start this process with the spawn method "
            "(multiprocessing.get_context('spawn'), torch.multiprocessing.spawn), or fork "
            "before the first loader opens"
        )


def secure_channel(
    address: str,
    options: Sequence[tuple[str, int | str]],
    security: ClientSecurity | None,
) -> grpc.aio.Channel:
    """A channel to `address`: TLS when `security` asks for it, else plain.

    Reads the TLS files once; a ValueError names any file that is unusable; a
    RuntimeError refuses a child forked after this client used gRPC.
    """
    _refuse_forked_child()
    opts = list(options)
    if security is None or not security.tls:
        return grpc.aio.insecure_channel(address, options=opts)
    root = None
    if security.tls_ca is not None:
        root = read_pem(security.tls_ca, "CA bundle (tls_ca)")
        check_ca(root, security.tls_ca, "CA bundle (tls_ca)")
    key = chain = None
    if security.tls_cert is not None and security.tls_key is not None:
        chain = read_pem(security.tls_cert, "client certificate (tls_cert)")
        key = read_pem(security.tls_key, "client private key (tls_key)")
        check_key_pair(security.tls_cert, security.tls_key, "client")
    if security.tls_server_name is not None:
        opts = [o for o in opts if o[0] != "grpc.ssl_target_name_override"]
        opts.append(("grpc.ssl_target_name_override", security.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(address, credentials, options=opts)


Metadata = tuple[tuple[str, str], ...]


def call_metadata(security: ClientSecurity | None) -> Metadata:
    """`(("authorization", "Bearer <token>"),)`, or `()` when no token is configured;
    reads `auth_token_file` now (`CallMetadata` follows the file)."""
    if security is None:
        return ()
    if security.auth_token is not None:
        token = security.auth_token.strip()
    elif security.auth_token_file is not None:
        token = read_token_file(security.auth_token_file)
    else:
        return ()
    return (("authorization", f"Bearer {token}"),)


class CallMetadata:
    """The metadata every call carries, from a `ClientSecurity`: calling it gives the
    token file's current token (a changed file is read again; one that cannot be used is
    logged once and the last good token kept). The file is read once here, so a missing
    or empty one is a ValueError at once."""

    def __init__(self, security: ClientSecurity | None) -> None:
        self._fixed = call_metadata(security)
        self._file: WatchedFiles[Metadata] | None = None
        if security is not None and security.auth_token_file is not None:
            path = security.auth_token_file
            self._file = WatchedFiles(
                (path,),
                lambda: (("authorization", f"Bearer {read_token_file(path)}"),),
                what=f"bearer token file {path}",
                applied="calls send its (first) token",
                log=log,
            )
        self._next_check = time.monotonic() + TOKEN_RECHECK_SECONDS

    def __call__(self) -> Metadata:
        if self._file is None:
            return self._fixed
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + TOKEN_RECHECK_SECONDS
            self._file.refresh()
        return self._file.value


def _check_token(token: str, where: str) -> None:
    # Never put the token itself in a message.
    if not token:
        raise ValueError(f"{where}: the bearer token is empty")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{where}: the bearer token must be printable ASCII without spaces or line breaks"
        )
