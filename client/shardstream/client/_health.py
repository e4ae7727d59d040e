"""Health watching: `conn.serving` follows each worker's standard health service.

A worker gets new reads only while its last health report was SERVING. A
worker that drains (NOT_SERVING) or goes away is left alone; when it is back
it must be described again (`conn.verified` is cleared) before it gets reads,
so a worker restarted with other data is never used. `suspect()` stops reads
to a worker that went silent until its health service answers again. A worker
ends each watch after a while (with a `shardstream-rewatch` trailer, so that
connections which only watch can age out): that watch is simply made again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from shardstream.client._workers import Conn

log = logging.getLogger("shardstream.client")


async def watch_health(conn: Conn, *, on_serving: Callable[[], None], pause: float) -> None:
    """Keep `conn.serving` current until cancelled; `on_serving()` when it turns SERVING;
    `pause` seconds between watches of a worker that went away."""
    while True:
        call = conn.watch_call = conn.health.watch()
        replies = 0
        try:
            async for reply in call:
                replies += 1
                serving = conn.health.is_serving(reply)
                if serving and not conn.serving:
                    log.info("worker %s is serving", conn.address)
                    on_serving()
                elif not serving and conn.serving:
                    log.info("worker %s is not serving; no new reads", conn.address)
                conn.serving = serving
            if replies and await conn.health.ended_to_rewatch(call):  # ended to be renewed
                continue
            conn.last_error = "health watch ended"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not conn.rewatch or (task is not None and task.cancelling()):
                raise
        except grpc.aio.AioRpcError as exc:
            conn.last_error = f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()
        conn.serving = False
        if not conn.rewatch:  # the worker went away: describe it again when back
            conn.verified = False
            if conn.excluded:  # a new process may serve the agreed data: it is checked
                log.info("worker %s went away; it is described again when back (it was left "
                         "out: %s)", conn.address, conn.excluded)  # fmt: skip
                conn.excluded = ""
            await asyncio.sleep(pause)
        conn.rewatch = False


def suspect(conn: Conn) -> None:
    """No reads for `conn` until its health service answers SERVING again, and it is
    described again: a worker that went silent may have been killed and restarted (the
    watch then sees only the new process SERVING)."""
    conn.serving = False
    conn.verified = False
    conn.rewatch = True
    if conn.watch_call is not None:
        conn.watch_call.cancel()
