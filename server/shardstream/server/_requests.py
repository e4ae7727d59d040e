"""What a request may ask of the catalog: each check raises its `errors` class.

Shard ids are the relative paths `DescribeDataset` lists; one that would leave
the data root is refused before it is looked up.
"""

from __future__ import annotations

from shardstream.server._catalog import Catalog, Dataset, Shard
from shardstream.server._wire import ReadArgs
from shardstream.server.errors import (
    BadRangeError,
    NotReadyError,
    ShardChangedError,
    ShardOutsideRootError,
    UnknownDatasetError,
    UnknownShardError,
)


def ready(catalog: Catalog | None) -> Catalog:
    """The catalog, once indexing is done."""
    if catalog is None:
        raise NotReadyError("the worker is still indexing")
    return catalog


def find_dataset(catalog: Catalog | None, name: str) -> Dataset:
    datasets = ready(catalog).datasets
    try:
        return datasets[name]
    except KeyError:
        known = ", ".join(sorted(datasets))
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; this worker serves: {known}", dataset=name
        ) from None


def check_read(catalog: Catalog | None, args: ReadArgs) -> tuple[Dataset, Shard]:
    """The dataset and shard a read names, once the read is found servable."""
    try:
        ds = find_dataset(catalog, args.dataset)
    except UnknownDatasetError:
        if not args.dataset_fingerprint:
            raise
        raise ShardChangedError(  # the client planned from a description of it, here
            f"this worker serves no dataset {args.dataset!r} any more, the client expects one "
            f"of fingerprint {args.dataset_fingerprint} (restarted with another "
            "configuration?)",
            dataset=args.dataset,
            shard=args.shard,
        ) from None
    sid = args.shard
    if args.dataset_fingerprint and args.dataset_fingerprint != ds.fingerprint:
        raise ShardChangedError(
            f"dataset {ds.name!r} has fingerprint {ds.fingerprint} here, the client expects "
            f"{args.dataset_fingerprint}: this worker serves other data or other transforms "
            "than the workers the client agreed with (restarted with another configuration?)",
            dataset=ds.name,
            shard=args.shard,
        )
    if "\0" in sid or sid.startswith(("/", "\\")) or ".." in sid.replace("\\", "/").split("/"):
        raise ShardOutsideRootError(
            f"shard id {sid!r} would leave the data root; shard ids are the relative "
            "paths that DescribeDataset lists",
            dataset=ds.name,
            shard=sid,
        )
    shard = ds.by_id.get(sid)
    if shard is None:
        raise UnknownShardError(
            f"dataset {ds.name!r} has no shard {sid!r}", dataset=ds.name, shard=sid
        )
    if args.start < 0 or args.count < 0 or args.start + args.count > shard.records:
        raise BadRangeError(
            f"records [{args.start}, {args.start + args.count}) are outside shard "
            f"{shard.id!r} of dataset {ds.name!r}, which has {shard.records} records",
            dataset=ds.name,
            shard=shard.id,
        )
    if args.shard_fingerprint and args.shard_fingerprint != shard.fingerprint:
        raise ShardChangedError(
            f"shard {shard.id!r} of dataset {ds.name!r} has fingerprint {shard.fingerprint}, "
            f"the client expects {args.shard_fingerprint}: the data differs between workers",
            dataset=ds.name,
            shard=shard.id,
        )
    return ds, shard
