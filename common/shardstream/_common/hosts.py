"""Host names as addresses and URLs write them: an IPv6 address in brackets."""

from __future__ import annotations


def bare_host(host: str) -> str:
    """`host` without the brackets of an IPv6 address ("[::1]" -> "::1")."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def url_host(host: str) -> str:
    """`host` as a URL or a HOST:PORT address names it: an IPv6 address in brackets
    ("::1" -> "[::1]")."""
    bare = bare_host(host)
    return f"[{bare}]" if ":" in bare else bare
