"""Ended same-host lanes whose memory a client may still hold, counted until it is gone.

    ended = EndedLanes()
    ended.keep(lane_id, fd, pid, pidfd, loop)   # at a lane's end: True if it kept the fd
    ended.nbytes(), len(ended)                  # what the lanes' budget counts
    ended.reclaim()                             # let go of what no client holds any more

The pages of a lane are written, so charged, by the worker, and a client keeps them
alive for as long as it keeps the memfd or a mapping of it, also after the lane
ended (`_lanes` frees the slots the client let go of when a lane ends; not the
others: its batches may view them). So an ended lane with pages left is kept: the
worker keeps the memfd's descriptor (to see what is left: `st_blocks`) and counts
it against its lanes' budget until the client is gone: its process exited (a
pidfd taken at the handshake becomes readable), or, when asked (`reclaim`), it has
the memfd neither open nor mapped, as far as /proc/PID tells. Where the worker
may not read the client's /proc (another user, another PID namespace) only its
exit lets go; where the client's pid is not known (0 from SO_PEERCRED: not in the
worker's PID namespace), nothing does until the worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger("shardstream.worker")

__all__ = ["EndedLanes", "open_pidfd", "peer_pid"]


@dataclass(eq=False, slots=True)
class _Ended:
    lane: str
    fd: int  # the memfd, the worker's own descriptor
    pid: int  # the client's process (0: unknown)
    pidfd: int  # a pidfd of it (-1: none)
    nbytes: int  # what was left of the lane's memory when it ended


class EndedLanes:
    """Ended lanes their clients may still hold (the event loop's thread only)."""

    def __init__(self) -> None:
        self._ended: dict[str, _Ended] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._ended)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._ended.values())

    def keep(
        self, lane: str, fd: int, pid: int, pidfd: int, loop: asyncio.AbstractEventLoop
    ) -> bool:
        """An ended lane's memfd `fd` (and `pidfd` of its client): kept, and True, if
        pages are left that the client may hold; False (the caller closes both) if not."""
        try:
            nbytes = os.fstat(fd).st_blocks * 512
        except OSError:
            return False
        if nbytes == 0 or (pidfd >= 0 and _exited(pidfd)):
            return False
        ended = self._ended[lane] = _Ended(lane, fd, pid, pidfd, nbytes)
        if pidfd >= 0:
            self._loop = loop
            loop.add_reader(pidfd, self._release, ended, "its client exited")
        log.info(
            "same-host lane %s: its client (pid %s) may still hold %d bytes of its memory; "
            "counted against the lanes' budget until it no longer does",
            lane,
            pid or "unknown",
            nbytes,
        )
        return True

    def reclaim(self) -> None:
        """Let go of ended lanes whose clients no longer have their memfd open or mapped."""
        for ended in list(self._ended.values()):
            ours = ended.fd if ended.pid == os.getpid() else -1  # a client in this process
            if ended.pid > 0 and not _holds(ended.pid, f"shardstream-lane-{ended.lane}", ours):
                self._release(ended, "its client no longer holds it")

    def close(self) -> None:
        """Let go of every one (the worker is stopping)."""
        for ended in list(self._ended.values()):
            self._release(ended, None)

    def _release(self, ended: _Ended, why: str | None) -> None:
        if self._ended.pop(ended.lane, None) is None:
            return
        if ended.pidfd >= 0:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(ended.pidfd)
            os.close(ended.pidfd)
        os.close(ended.fd)
        if why is not None:
            log.info("same-host lane %s: %d bytes let go (%s)", ended.lane[:4], ended.nbytes, why)


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (0: not known)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return 0
    pid: int = struct.unpack("3i", creds)[0]
    return max(0, pid)


def open_pidfd(pid: int) -> int:
    """A pidfd of `pid` (-1: none, e.g. the process is in another PID namespace)."""
    if pid <= 0 or not hasattr(os, "pidfd_open"):
        return -1
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


def _exited(pidfd: int) -> bool:
    """Whether the process of `pidfd` has exited (its pidfd is readable then)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def _holds(pid: int, name: str, ours: int = -1) -> bool:
    """Whether process `pid` has the memfd called `name` open (but as descriptor `ours`)
    or mapped; True where /proc does not say (no permission), False once it is gone."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            if any(name.encode() in line for line in maps):
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if fd == str(ours):
                continue
            with contextlib.suppress(OSError):
                if name in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    return True
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False
