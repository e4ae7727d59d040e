"""PEM and bearer-token files, read with errors that name the file and the fix.

One reader for both sides: a worker's certificate and a client's CA bundle fail
with the same precise message.
"""

from __future__ import annotations

from pathlib import Path


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or a ValueError naming the file and what is wrong."""
    data = _read_bytes(path, what)
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not PEM: expected a '-----BEGIN ...' block")
    return data


def read_token_file(path: Path) -> str:
    """The token in `path`, surrounding whitespace stripped; refuses an empty or odd token."""
    what = "auth token file (auth_token_file)"
    try:
        token = _read_bytes(path, what).decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what} {path} holds non-ASCII bytes: a bearer token must be printable ASCII"
        ) from exc
    if not token:
        raise ValueError(f"{what} {path} is empty: write the token into it")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{what} {path}: the token must be printable ASCII without spaces or line breaks"
        )
    return token


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
