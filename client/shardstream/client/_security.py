"""The client's transport security: TLS, mTLS client certificates and a bearer token.

    security = ClientSecurity(tls_ca=Path("ca.pem"), auth_token_file=Path("token"))
    channel = secure_channel("worker:50051", options, security)
    metadata = call_metadata(security)              # once per client; pass to every call

The token is sent as ordinary call metadata (`authorization: Bearer <token>`),
so it also works on channels without TLS; there it travels in clear text and
anyone on the path can read it. Use TLS wherever the network is not trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# One reader for PEM and token files on both sides, with the same precise errors.
from shardstream._common.pem import read_pem, read_token_file

__all__ = ["ClientSecurity", "call_metadata", "secure_channel"]


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


def secure_channel(
    address: str,
    options: Sequence[tuple[str, int | str]],
    security: ClientSecurity | None,
) -> grpc.aio.Channel:
    """A channel to `address`: TLS when `security` asks for it, else plain.

    Reads the TLS files once; a ValueError names any file that is unusable.
    """
    opts = list(options)
    if security is None or not security.tls:
        return grpc.aio.insecure_channel(address, options=opts)
    root = None if security.tls_ca is None else read_pem(security.tls_ca, "CA bundle (tls_ca)")
    key = chain = None
    if security.tls_cert is not None and security.tls_key is not None:
        chain = read_pem(security.tls_cert, "client certificate (tls_cert)")
        key = read_pem(security.tls_key, "client private key (tls_key)")
    if security.tls_server_name is not None:
        opts = [o for o in opts if o[0] != "grpc.ssl_target_name_override"]
        opts.append(("grpc.ssl_target_name_override", security.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(address, credentials, options=opts)


def call_metadata(security: ClientSecurity | None) -> tuple[tuple[str, str], ...]:
    """`(("authorization", "Bearer <token>"),)`, or `()` when no token is configured.

    Reads `auth_token_file` on each call: call it once per client and reuse the result.
    """
    if security is None:
        return ()
    if security.auth_token is not None:
        token = security.auth_token.strip()
    elif security.auth_token_file is not None:
        token = read_token_file(security.auth_token_file)
    else:
        return ()
    return (("authorization", f"Bearer {token}"),)


def _check_token(token: str, where: str) -> None:
    # Never put the token itself in a message.
    if not token:
        raise ValueError(f"{where}: the bearer token is empty")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{where}: the bearer token must be printable ASCII without spaces or line breaks"
        )
