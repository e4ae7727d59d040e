"""shardstream worker: serves dataset shards as typed tensor streams over gRPC."""

import os

# gRPC's C core logs INFO lines (e.g. "Got goaway") on ordinary shutdowns unless told
# otherwise; it reads GRPC_VERBOSITY when grpc is imported, so this must come first. A
# value the user set wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from shardstream.server._config import DatasetSpec, WorkerConfig
from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._synth import make_dataset
from shardstream.server._worker import Worker

__all__ = [
    "DatasetSpec",
    "DecodeError",
    "Decoder",
    "ShardMeta",
    "Worker",
    "WorkerConfig",
    "make_dataset",
    "register_decoder",
]
