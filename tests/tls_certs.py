"""Throwaway TLS material for tests, made with the `openssl` command line.

    certs = make_certs(tmp_path_factory.mktemp("tls"))   # once per session

EC P-256 keys, valid for a day: a CA, a server certificate for `localhost`
and 127.0.0.1 and a client certificate signed by it, and an unrelated CA with
its own client certificate for "wrong CA" cases.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certs", "make_certs"]

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {server_names},IP:127.0.0.1
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True, kw_only=True)
class Certs:
    """Paths of the generated PEM files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # an unrelated CA
    other_ca_key: Path
    other_client_cert: Path  # a client certificate signed by the unrelated CA
    other_client_key: Path


def make_certs(directory: Path, server_names: tuple[str, ...] = ("localhost",)) -> Certs:
    """Generate the certificates into `directory` (about 0.1 s), the server's valid for
    `server_names` and 127.0.0.1; needs `openssl` on PATH."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the `openssl` command line is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG.format(server_names=",".join(f"DNS:{n}" for n in server_names)))

    def req(name: str, subject: str, section: str, ca: str | None = None) -> None:
        cmd = [
            openssl,
            "req",
            "-x509",
            "-new",
            "-config",
            str(config),
            "-extensions",
            section,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={subject}",
            "-keyout",
            str(directory / f"{name}.key"),
            "-out",
            str(directory / f"{name}.crt"),
        ]
        if ca is not None:
            cmd += ["-CA", str(directory / f"{ca}.crt"), "-CAkey", str(directory / f"{ca}.key")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl failed making {name}: {done.stderr.strip()}")

    req("ca", "shardstream test CA", "ca")
    req("server", "localhost", "server", ca="ca")
    req("client", "shardstream test client", "client", ca="ca")
    req("other_ca", "unrelated test CA", "ca")
    req("other_client", "unrelated test client", "client", ca="other_ca")
    return Certs(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca_cert=directory / "other_ca.crt",
        other_ca_key=directory / "other_ca.key",
        other_client_cert=directory / "other_client.crt",
        other_client_key=directory / "other_client.key",
    )
