"""Worker targets: plain `host:port` addresses, or `dns:///name:port` names that
stand for every address the name resolves to (a compose service with replicas,
a Kubernetes headless service). Names are resolved at start and again every
`interval` seconds, so workers that join later get reads too, and those whose
address is gone (a replaced pod) are let go."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence

DNS_PREFIX = "dns:"

log = logging.getLogger("shardstream.client")


def split_host_port(target: str) -> tuple[str, int]:
    """("name", port) of "dns:///name:port", "dns://authority/name:port" or "name:port"."""
    rest = target
    if rest.startswith(DNS_PREFIX):
        rest = rest[len(DNS_PREFIX) :]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"worker target {target!r} must end in :PORT, e.g. dns:///worker:50051")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(target: str) -> list[str]:
    """The addresses a target stands for (itself, unless it is a dns: name)."""
    if not target.startswith(DNS_PREFIX):
        return [target]
    host, port = split_host_port(target)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: dict[str, None] = {}
    for family, *_, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[format_address(str(sockaddr[0]), port)] = None
    return list(seen)


async def resolve_all(targets: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(addresses, {target: error}) for every target; a name that does not resolve is an error."""
    addresses: dict[str, None] = {}
    errors: dict[str, str] = {}
    for target in targets:
        try:
            for address in await resolve(target):
                addresses[address] = None
        except (OSError, ValueError) as exc:
            errors[target] = f"cannot resolve: {exc}"
    return list(addresses), errors


async def follow_names(
    targets: Sequence[str], interval: float, on_addresses: Callable[[list[str], bool], None]
) -> None:
    """Every `interval` seconds, resolve `targets` again and call `on_addresses` with the
    addresses found and whether every target resolved (only then is an address missing
    from them gone); runs until cancelled."""
    while True:
        await asyncio.sleep(interval)
        addresses, errors = await resolve_all(targets)
        for target, error in errors.items():
            log.warning("%s: %s", target, error)
        on_addresses(addresses, not errors)
