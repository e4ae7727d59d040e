"""shardstream client: deterministic, exactly-once batches from a fleet of workers."""

import shardstream._common.environment  # noqa: F401  (first: settings read when grpc loads)
from shardstream._common import tune_malloc
from shardstream.client._loader import Loader
from shardstream.client._options import EpochStatistics, LoaderConfig, LoaderStatistics
from shardstream.client._planner import PlanOptions, RankPlan, Read, Window, plan_epoch
from shardstream.client._security import ClientSecurity
from shardstream.client._sync import SyncLoader
from shardstream.client._wire import DatasetDesc, ShardDesc, check_health

__all__ = [
    "ClientSecurity",
    "DatasetDesc",
    "EpochStatistics",
    "Loader",
    "LoaderConfig",
    "LoaderStatistics",
    "PlanOptions",
    "RankPlan",
    "Read",
    "ShardDesc",
    "SyncLoader",
    "Window",
    "check_health",
    "plan_epoch",
    "tune_malloc",
]
