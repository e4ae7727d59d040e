"""shardstream worker: serves dataset shards as typed tensor streams over gRPC."""

import shardstream._common.environment  # noqa: F401  (first: settings read when grpc loads)
from shardstream.server._config import DatasetSpec, TransformSpec, WorkerConfig
from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._synth import make_dataset
from shardstream.server._worker import Worker

__all__ = [
    "DatasetSpec",
    "DecodeError",
    "Decoder",
    "ShardMeta",
    "TransformSpec",
    "Worker",
    "WorkerConfig",
    "make_dataset",
    "register_decoder",
]
