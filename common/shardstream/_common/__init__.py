"""What the worker and the client both need, and nothing else.

Neither `shardstream.server` nor `shardstream.client` imports the other; both
import this package (and the wire contract, `shardstream.v1`). It holds:

- `environment`: process-wide gRPC settings, applied by importing it before `grpc`;
- `loops`: the event-loop factory (uvloop when installed), `run_async`, `wait_done`,
  `TIMER_SLACK`;
- `malloc`: glibc malloc tuning for processes moving multi-MiB messages;
- `pem`: readers for PEM and bearer-token files with precise errors;
- `watched`: files reread when they change (TLS files, token files);
- `sizes`: byte sizes with units (`16MiB`);
- `args`: what both command lines share: flag types, env defaults, the usage parser.
"""

from shardstream._common.loops import new_event_loop, run_async, wait_done
from shardstream._common.malloc import trim_heap, tune_malloc
from shardstream._common.pem import read_pem, read_token_file, read_tokens_file
from shardstream._common.watched import WatchedFiles

__all__ = [
    "WatchedFiles",
    "new_event_loop",
    "read_pem",
    "read_token_file",
    "read_tokens_file",
    "run_async",
    "trim_heap",
    "tune_malloc",
    "wait_done",
]
