"""Bad data and bad requests: precise refusals, the skip policy, nothing read outside the root."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client._wire import WorkerStub, encode_read
from shardstream.client.errors import DataLossError, ShardChangedError
from shardstream.server import make_dataset
from shardstream.server._catalog import CatalogError

from conftest import collect_epoch, ids_of, running_workers


def csv_with_bad_lines(root: Path, bad: dict[int, str]) -> None:
    """4 csv shards of 25 records (ids 0..99); `bad` maps a global id to its broken line."""
    make_dataset(root, shards=4, records=100, shape=(3,), format="csv")
    for shard in range(4):
        path = root / f"part-{shard:03d}"
        lines = path.read_text().splitlines()
        for gid, text in bad.items():
            if gid // 25 == shard:
                lines[gid % 25] = text
        path.write_text("\n".join(lines) + "\n")


async def test_corrupt_record_raises_naming_worker_dataset_shard_and_record(tmp_path: Path) -> None:
    csv_with_bad_lines(tmp_path, {37: "37,7,1,2,not-a-number"})
    async with running_workers(tmp_path, 1, datasets=("train=part-*:csv",)) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=10) as loader:
            with pytest.raises(DataLossError) as info:
                await collect_epoch(loader, 0)
    err = info.value
    assert (err.worker, err.dataset, err.shard, err.record) == (
        worker.address,
        "train",
        "part-001",
        12,
    )
    assert "part-001" in str(err) and "record 12" in str(err)


async def test_sync_loader_raises_a_failure_after_the_batches_before_it(tmp_path: Path) -> None:
    """Through the SyncLoader's hand-off the batches before the bad record arrive, then
    the same precise error; the loader stays usable for the next epoch's attempt."""
    csv_with_bad_lines(tmp_path, {37: "37,7,1,2,not-a-number"})
    async with running_workers(tmp_path, 1, datasets=("train=part-*:csv",)) as (worker,):

        def run() -> tuple[list[int], DataLossError, int]:
            got: list[int] = []
            with SyncLoader([worker.address], dataset="train", batch_size=10) as loader:
                with pytest.raises(DataLossError) as info:
                    for batch in loader.epoch(0):
                        got += batch["id"].tolist()
                batches = loader.statistics().batches
                with pytest.raises(DataLossError):
                    list(loader.epoch(1))
                return got, info.value, batches

        got, err, batches = await asyncio.to_thread(run)
    # Whole batches in order, up to the chunk that holds the bad record 37 (batch 3 at
    # the latest); a batch is never cut short by the failure.
    assert got == list(range(len(got))) and len(got) % 10 == 0 and len(got) <= 30
    assert (err.shard, err.record) == ("part-001", 12)
    assert batches == len(got) // 10


async def test_schema_mismatch_in_a_record_is_data_loss(tmp_path: Path) -> None:
    csv_with_bad_lines(tmp_path, {60: "60,0,1,2"})  # a column short
    async with running_workers(tmp_path, 1, datasets=("train=part-*:csv",)) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=10) as loader:
            with pytest.raises(DataLossError) as info:
                await collect_epoch(loader, 0)
    assert (info.value.shard, info.value.record) == ("part-002", 10)


@pytest.mark.parametrize("shuffle_window", [0, 16])
async def test_skip_policy_leaves_out_bad_records_and_keeps_equal_steps(
    tmp_path: Path, shuffle_window: int
) -> None:
    bad = {3: "3,3,x,1,1", 40: "40,0,1", 41: "41,1,1", 99: "99,bad,0,0,0"}
    csv_with_bad_lines(tmp_path, bad)
    opts = {"dataset": "train", "batch_size": 8, "world_size": 2, "on_error": "skip",
            "shuffle": shuffle_window > 0, "shuffle_window": shuffle_window}  # fmt: skip
    async with running_workers(tmp_path, 2, datasets=("train=part-*:csv",)) as workers:
        addresses = [w.address for w in workers]
        ranks = []
        for rank in range(2):
            async with Loader(addresses, rank=rank, **opts) as loader:
                ranks.append((await collect_epoch(loader, 0), loader.statistics(), loader.plan(0)))
    batches = [len(r[0]) for r in ranks]
    assert batches == [r[2].batches for r in ranks] == [7, 7]  # 50 per rank: 6 x 8 + 2
    ids = np.concatenate([ids_of(r[0]) for r in ranks])
    assert sorted(ids.tolist()) == sorted(set(range(100)) - set(bad))
    assert sum(r[1].records_skipped for r in ranks) == len(bad)
    assert sum(len(b["id"]) for r in ranks for b in r[0]) == 100 - len(bad)


async def test_shard_changed_after_indexing_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=2, records=40, shape=(2,))
    async with running_workers(tmp_path, 1) as (worker,):
        path = tmp_path / "shard-00001.npz"
        data = dict(np.load(path))
        np.savez(path, **{k: v[:10] for k, v in data.items()})  # now 10 records, was 20
        async with Loader([worker.address], dataset="train", batch_size=5) as loader:
            with pytest.raises(ShardChangedError) as info:
                await collect_epoch(loader, 0)
    assert info.value.shard == "shard-00001.npz"
    assert "changed since it was indexed" in str(info.value)


async def read_status(address: str, **request: object) -> tuple[grpc.StatusCode, str]:
    fields = {"dataset": "train", "shard": "shard-00000.npz", "start": 0, "count": 1, "seed": 0,
              "fingerprint": "", "max_chunk_records": 0}  # fmt: skip
    fields.update(request)
    async with grpc.aio.insecure_channel(address) as channel:
        call = WorkerStub(channel).read(encode_read(**fields))  # type: ignore[arg-type]
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("request_fields", "code", "text"),
    [
        ({"shard": "../secret.npz"}, grpc.StatusCode.PERMISSION_DENIED, "leave the data root"),
        ({"shard": "/etc/passwd"}, grpc.StatusCode.PERMISSION_DENIED, "leave the data root"),
        ({"shard": "sub/../../x"}, grpc.StatusCode.PERMISSION_DENIED, "leave the data root"),
        ({"shard": "shard-00000.npz\0"}, grpc.StatusCode.PERMISSION_DENIED, "leave the data root"),
        ({"shard": "link.npz"}, grpc.StatusCode.NOT_FOUND, "has no shard 'link.npz'"),
        ({"shard": "nope.npz"}, grpc.StatusCode.NOT_FOUND, "has no shard"),
        ({"dataset": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown dataset 'nope'"),
        ({"start": -1}, grpc.StatusCode.INVALID_ARGUMENT, "outside shard"),
        ({"count": -5}, grpc.StatusCode.INVALID_ARGUMENT, "outside shard"),
        ({"start": 20, "count": 1}, grpc.StatusCode.INVALID_ARGUMENT, "which has 20 records"),
        ({"fingerprint": "0" * 24}, grpc.StatusCode.FAILED_PRECONDITION, "fingerprint"),
    ],
)
async def test_bad_requests_are_refused(
    tmp_path: Path, request_fields: dict[str, object], code: grpc.StatusCode, text: str
) -> None:
    root = tmp_path / "root"
    make_dataset(root, shards=2, records=40, shape=(2,))
    (tmp_path / "secret.npz").write_bytes((root / "shard-00000.npz").read_bytes())
    async with running_workers(root, 1) as (worker,):
        # A symlink appearing after start-up is never served: shards are what was indexed.
        os.symlink(tmp_path / "secret.npz", root / "link.npz")
        got, details = await read_status(worker.address, **request_fields)
    assert got == code
    assert text in details


async def test_symlink_out_of_the_root_refuses_start(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_dataset(root, shards=1, records=5, shape=(2,))
    make_dataset(tmp_path / "outside", shards=1, records=5, shape=(2,))
    os.symlink(tmp_path / "outside" / "shard-00000.npz", root / "escape.npz")
    with pytest.raises(CatalogError, match=r"escape.npz resolves to .*outside the data root"):
        async with running_workers(root, 1):
            pass


async def test_pickled_payload_refuses_start(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", id=np.arange(2), obj=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(CatalogError, match="cannot index a shard"):
        async with running_workers(tmp_path, 1):
            pass


def test_globs_cannot_leave_the_root() -> None:
    from shardstream.server import DatasetSpec

    with pytest.raises(ValueError, match="must stay inside the data root"):
        DatasetSpec.parse("train=../*.npz")
    with pytest.raises(ValueError, match="must stay inside the data root"):
        DatasetSpec.parse("train=/etc/*")


async def test_csv_schema_file_must_match_the_columns(tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=1, records=5, shape=(3,), format="csv")
    schema = {"fields": [{"name": "id", "dtype": "int64", "shape": []}]}
    (tmp_path / "_schema.json").write_text(json.dumps(schema))
    with pytest.raises(CatalogError, match="part-000"):
        async with running_workers(tmp_path, 1, datasets=("train=part-*:csv",)):
            pass


async def test_truncated_npz_shard_refuses_start_naming_shard_and_record(tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=2, records=40, shape=(64,))
    path = tmp_path / "shard-00001.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CatalogError, match=r"shard-00001.npz is truncated: .* at record \d+ of 20"):
        async with running_workers(tmp_path, 1):
            pass
