"""Health watches: a bounded number without a token, each for a bounded time.

    guard = WatchGuard(max_untrusted=2048, seconds=15.0, trusted=token.accepts)
    server = grpc.aio.server(interceptors=[token, guard, ...])

The standard `grpc.health.v1.Health/Watch` needs no token (probes must reach it),
and a connection with a call running is never idle, so never closed for it: enough
connections that only watch would hold every `--max-connections` slot and lock
token holders out. So:

- watches that carry no valid bearer token (every watch, where the worker has no
  token) run at most `max_untrusted` at once; more get RESOURCE_EXHAUSTED at once,
  and their connections, left without calls, are closed when idle. Watches of token
  holders (a loader sends its token on them) are never refused;
- every watch ends after `seconds` with OK and the trailer `shardstream-rewatch`,
  which tells a loader to watch again at once (on the connection it has by then)
  rather than take the worker for gone. It is shorter than the time an aged
  connection is given (`--max-connection-age`), so no watch is cut by the age.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from shardstream.server._status import BUSY_HEADER, LogLimit

__all__ = ["REWATCH_HEADER", "WATCH_METHOD", "WatchGuard"]

WATCH_METHOD = "/grpc.health.v1.Health/Watch"
REWATCH_HEADER = "shardstream-rewatch"  # trailer of a watch the worker ended: watch again

log = logging.getLogger("shardstream.worker")


class WatchGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bounds health Watch calls (see the module doc); other calls pass untouched."""

    def __init__(
        self,
        *,
        max_untrusted: int,
        seconds: float,
        trusted: Callable[[Any], bool] | None = None,
    ) -> None:
        """`trusted(metadata)`: whether a call carries a valid token (None: no token, so
        no watch is trusted)."""
        self._max = max_untrusted
        self._seconds = seconds
        self._trusted = trusted
        self.untrusted = 0  # watches without a token running now
        self._refusals = LogLimit(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != WATCH_METHOD:
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        trusted = self._trusted is not None and self._trusted(metadata)
        return grpc.unary_stream_rpc_method_handler(
            self._watch(handler.unary_stream, trusted),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _watch(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]], trusted: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        async def watch(request: Any, context: grpc.aio.ServicerContext) -> None:
            if not trusted and self.untrusted >= self._max:
                self._refusals.log(
                    logging.WARNING,
                    "health watches",
                    "refused a health Watch without a token: %d run (--max-health-watches)",
                    self.untrusted,
                )
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the worker already runs {self.untrusted} health watches without a "
                    "token (--max-health-watches): use Check, or watch later",
                    trailing_metadata=((BUSY_HEADER, "1"),),
                )
            self.untrusted += not trusted
            try:
                async with asyncio.timeout(self._seconds):
                    await behavior(request, context)
            except TimeoutError:  # its time is up: OK, and the client watches again
                context.set_trailing_metadata(((REWATCH_HEADER, "1"),))
            finally:
                self.untrusted -= not trusted

        return watch
