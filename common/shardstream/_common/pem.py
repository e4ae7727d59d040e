"""PEM and bearer-token files, read with errors that name the file and the fix.

One reader for both sides: a worker's certificate and a client's CA bundle fail
with the same precise message.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or a ValueError naming the file and what is wrong."""
    data = _read_bytes(path, what)
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not PEM: expected a '-----BEGIN ...' block")
    return data


def _no_password() -> bytes:
    raise ValueError("it is encrypted: give an unencrypted key (gRPC needs one)")


def check_key_pair(cert: Path, key: Path, side: str) -> None:
    """ValueError naming both files unless `key` is the private key of `cert`'s
    certificate, unencrypted, as TLS will use them (`side`: "TLS" for a worker's own,
    "client" for a client's mTLS pair)."""
    pair = f"{side} certificate (tls_cert) {cert} and key (tls_key) {key}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")  # only whether they pair: gRPC judges key sizes
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"{pair} do not match: the key is not the certificate's "
                "(was one replaced without the other?)"
            ) from None
        raise ValueError(f"{pair} cannot be loaded ({exc.reason or exc}): check both") from None
    except ValueError as exc:
        raise ValueError(f"{pair}: the key cannot be used: {exc}") from None
    except OSError as exc:  # replaced or removed since it was read
        raise ValueError(f"{pair} cannot be read ({exc.strerror or exc})") from None


def check_ca(data: bytes, path: Path, what: str) -> None:
    """ValueError naming the file unless `data` (its PEM) holds a usable certificate."""
    try:  # (text around the PEM blocks, such as a bundle's UTF-8 comments, is ignored)
        ssl.create_default_context(cadata=data.decode("ascii", "ignore"))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"{what} {path} holds no usable certificate ({getattr(exc, 'reason', '') or exc})"
        ) from None


def read_tokens_file(path: Path) -> tuple[str, ...]:
    """The bearer tokens in `path`, one per line (blank lines ignored): a worker accepts
    any of them, a client sends the first. Several tokens let a token change without
    refusing anyone: the worker's file holds the new and the old token while the
    clients' files are changed, then only the new one. ValueError if none, or an odd one."""
    what = "auth token file (auth_token_file)"
    try:
        text = _read_bytes(path, what).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what} {path} holds non-ASCII bytes: a bearer token must be printable ASCII"
        ) from exc
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"{what} {path} is empty: write the token into it")
    for n, token in enumerate(tokens, 1):
        if not all("!" <= c <= "~" for c in token):
            raise ValueError(
                f"{what} {path}, token {n}: a token must be printable ASCII without spaces "
                "(one token per line)"
            )
    return tokens


def read_token_file(path: Path) -> str:
    """The token a client sends: the first in `path` (see `read_tokens_file`)."""
    return read_tokens_file(path)[0]


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ValueError(f"{what} {path} does not exist: check the path") from exc
    except OSError as exc:
        raise ValueError(
            f"{what} {path} cannot be read ({exc.strerror or exc}): check its permissions"
        ) from exc
    if not data.strip():
        raise ValueError(f"{what} {path} is empty")
    return data
