"""Files reread when they change: TLS certificates, keys and token files, on both sides.

    token = WatchedFiles((path,), lambda: read_tokens_file(path), what="token file",
                         applied="calls use the new token", log=log)
    token.refresh()      # a few stat calls; rereads only when a file changed
    token.value          # the last contents that could be used

Files are told apart by device, inode, size and modification time. A new version that
cannot be used (the reader raises ValueError: a key that is not the certificate's, an
empty token) is logged once and the previous one kept; so is one that changed while it
was read, until it settles. Thread-safe: gRPC asks from its own threads.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["WatchedFiles"]

T = TypeVar("T")

_Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: Sequence[Path]) -> _Stamp:
    """What tells a file's versions apart, cheaply: device, inode, size, modification time
    (None for a file that cannot be looked at)."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class WatchedFiles(Generic[T]):
    """What `read()` makes of some files, read again by `refresh()` when their stats
    change. Contents that cannot be used (`read` raises ValueError) are logged once and
    the last good ones kept; so are files that changed while being read, until they
    settle. Thread-safe: gRPC asks from its own threads."""

    def __init__(
        self,
        paths: Sequence[Path],
        read: Callable[[], T],
        *,
        what: str,
        applied: str,
        log: logging.Logger,
    ) -> None:
        self._log = log
        self._paths = tuple(paths)
        self._read = read
        self._what = what
        self._applied = applied
        self._lock = threading.Lock()
        for _ in range(3):  # files being replaced right now: read them again
            stamp, value = self._read_settled()
            if stamp is not None:
                break
        if stamp is None:
            raise ValueError(f"the {what} kept changing while being read: try again")
        if isinstance(value, ValueError):
            raise value
        self._stamp = stamp
        self.value: T = value
        self.version = 0  # counts the changes taken up

    def refresh(self) -> int:
        """Read the files again if they changed; the `version` of `value` after it."""
        with self._lock:
            stamp = _stamp(self._paths)
            if stamp == self._stamp:
                return self.version
            now, value = self._read_settled()
            if now is None:
                return self.version  # changed while read: try again next time
            self._stamp = now
            if isinstance(value, ValueError):
                self._log.warning(
                    "the %s changed but cannot be used, keeping the previous ones until "
                    "they are fixed: %s",
                    self._what,
                    value,
                )
                return self.version
            self.value = value
            self.version += 1
            self._log.info("the %s changed: %s", self._what, self._applied)
            return self.version

    def _read_settled(self) -> tuple[_Stamp | None, T | ValueError]:
        """(stamp, contents or why they cannot be used); the stamp is None when the files
        changed while being read (the contents may be half of one version)."""
        before = _stamp(self._paths)
        try:
            value: T | ValueError = self._read()
        except ValueError as exc:
            value = exc
        return (before if _stamp(self._paths) == before else None), value
