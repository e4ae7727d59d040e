"""shardstream client: deterministic, exactly-once batches from a fleet of workers."""

import os

# gRPC's C core logs INFO lines (e.g. "Got goaway") on ordinary shutdowns unless told
# otherwise; it reads GRPC_VERBOSITY when grpc is imported, so this must come first. A
# value the user set wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from shardstream.client._loader import Loader
from shardstream.client._options import LoaderConfig, LoaderStatistics
from shardstream.client._planner import PlanOptions, RankPlan, Read, Window, plan_epoch
from shardstream.client._security import ClientSecurity
from shardstream.client._sync import SyncLoader
from shardstream.client._wire import DatasetDesc, ShardDesc, check_health
from shardstream.server._malloc import tune_malloc

__all__ = [
    "ClientSecurity",
    "DatasetDesc",
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
