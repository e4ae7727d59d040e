"""Process-wide gRPC settings; importing this module applies them.

gRPC's C core logs INFO lines (e.g. "Got goaway") on ordinary shutdowns unless
told otherwise, and it reads GRPC_VERBOSITY when `grpc` is first imported, so
`shardstream.server` and `shardstream.client` import this module before
anything else. A value the user set wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
