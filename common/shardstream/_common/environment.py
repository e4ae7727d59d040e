"""Process-wide gRPC settings; importing this module applies them.

gRPC's C core reads these when `grpc` is first imported, so `shardstream.server`
and `shardstream.client` import this module before anything else. A value the
user set wins.

- GRPC_VERBOSITY=ERROR: the core logs INFO lines (e.g. "Got goaway") on ordinary
  shutdowns otherwise.
- GRPC_ENABLE_FORK_SUPPORT=0: the core's fork handlers serve only grpc's
  synchronous stack; with grpc.aio's threads running (every open loader), a child
  forked from the process (a DataLoader worker, a multiprocessing pool) crashed in
  them about one time in six, before any of its own code ran (measured: 3 of 20
  forks). Off, the child starts; it cannot use the parent's channels either way.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
