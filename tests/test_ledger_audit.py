"""`shardstream audit` against ledgers a loader writes and ledgers doctored by hand: a
padded epoch passes, a line spoiled in the middle of a file is named (it hid the rest of
the file), hostile headers are one-line errors (they were tracebacks, hours of planning
or gigabytes of memory), and a range repeated many times costs no more than once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstream.cli import main as cli
from shardstream.client import Loader
from shardstream.client._ledger import LedgerError, audit

from conftest import RECORDS, running_workers

WORLD = 3  # 2000 records: 2 of them padded with remainder="pad"


@pytest.fixture(scope="module")
def ledger(npz_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A padded epoch of 3 ranks, as loaders write it."""
    directory = tmp_path_factory.mktemp("ledger")

    async def write() -> None:
        async with running_workers(npz_root, 1) as (worker,):
            for rank in range(WORLD):
                async with Loader(
                    worker.address, dataset="train", batch_size=16, rank=rank,
                    world_size=WORLD, remainder="pad", ledger_dir=str(directory),
                ) as loader:  # fmt: skip
                    async for _ in loader.epoch(0):
                        pass

    asyncio.run(write())
    yield directory


def _copy(ledger: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    out = tmp_path / "copy"
    (out / "epoch-00000").mkdir(parents=True)
    files = []
    for src in sorted((ledger / "epoch-00000").glob("*.jsonl")):
        dst = out / "epoch-00000" / src.name
        dst.write_bytes(src.read_bytes())
        files.append(dst)
    return out, files


def _edit(path: Path, change: Any) -> None:
    lines = path.read_text().splitlines(keepends=True)
    change(lines)
    path.write_text("".join(lines))


def test_a_padded_epoch_is_exactly_once_with_its_padding_planned(ledger: Path) -> None:
    """`remainder="pad"` delivers some records twice by plan: the audit called every
    correct padded epoch a failure ("duplicated")."""
    (epoch,) = list(audit(ledger))
    assert epoch.ok, (epoch.missing[:3], epoch.duplicated[:3])
    padded = -(-RECORDS // WORLD) * WORLD
    assert epoch.expected == epoch.received == padded > RECORDS
    assert cli(["audit", str(ledger)]) == 0


def test_a_spoiled_line_in_the_middle_is_named_not_taken_for_the_end(
    ledger: Path, tmp_path: Path
) -> None:
    """Only the last line may be cut (by a kill); one spoiled before it silently dropped
    the rest of its file, and a line after it was never checked."""
    copy, files = _copy(ledger, tmp_path)
    _edit(files[1], lambda lines: lines.insert(3, "not json\n"))
    with pytest.raises(LedgerError, match="line 4: not JSON, and not the file's last line"):
        list(audit(copy))
    copy2, files2 = _copy(ledger, tmp_path / "cut")
    last = json.loads(files2[1].read_text().splitlines()[-1])
    _edit(files2[1], lambda lines: lines.__setitem__(-1, lines[-1][:20]))  # cut at the end
    (epoch,) = list(audit(copy2))
    missing = sum(n for _, _, n in epoch.missing)
    assert missing == sum(n for _, _, n in last["ranges"]) > 0  # that batch, no more


def _header(files: list[Path], **change: Any) -> None:
    def edit(lines: list[str]) -> None:
        header = json.loads(lines[0])
        for key, value in change.items():
            if key.startswith("options."):
                header["options"][key.removeprefix("options.")] = value
            else:
                header[key] = value
        lines[0] = json.dumps(header) + "\n"

    for path in files:
        _edit(path, edit)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"options.batch_size": 1.5}, "options.batch_size is not a int"),
        ({"options.shuffle": "no"}, "options.shuffle is not a bool"),
        ({"options.shuffle_window": 2.5}, "options.shuffle_window is not a int"),
        ({"options.unknown": 1}, "unknown key 'unknown'"),
        ({"world_size": 10**9, "rank": 0}, "world_size 1000000000"),
    ],
)
def test_hostile_headers_are_one_line_errors(
    ledger: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """Were: a TypeError traceback from the planner, an audit of nonsense (a float batch
    size), or a plan per rank of a billion ranks."""
    copy, files = _copy(ledger, tmp_path)
    _header(files, **change)
    with pytest.raises(LedgerError, match=message):
        list(audit(copy))
    assert cli(["audit", str(copy)]) == 1


def test_deeply_nested_lines_are_not_json(ledger: Path, tmp_path: Path) -> None:
    copy, files = _copy(ledger, tmp_path)
    _edit(files[0], lambda lines: lines.__setitem__(0, "[" * 200_000 + "\n"))
    with pytest.raises(LedgerError, match="the header line is not JSON"):
        list(audit(copy))


def test_skips_of_records_outside_the_dataset_are_refused(ledger: Path, tmp_path: Path) -> None:
    copy, files = _copy(ledger, tmp_path)
    shard = json.loads(files[0].read_text().splitlines()[0])["shard_ids"][0]
    skip = json.dumps({"kind": "skip", "shard": shard, "record": 10**12}) + "\n"
    _edit(files[0], lambda lines: lines.insert(2, skip))
    with pytest.raises(LedgerError, match="a skip of no record of the dataset"):
        list(audit(copy))


def test_a_range_repeated_many_times_is_counted_once_per_range(
    ledger: Path, tmp_path: Path
) -> None:
    """A batch line whose one range is repeated N times cost N x its records in Python
    (a 16 MiB line of 50M-record ranges: days); each range is one step now."""
    copy, files = _copy(ledger, tmp_path)

    def repeat(lines: list[str]) -> None:
        batch = json.loads(lines[1])
        batch["ranges"] = batch["ranges"][:1] * 5000
        lines[1] = json.dumps(batch) + "\n"

    _edit(files[0], repeat)
    (epoch,) = list(audit(copy))
    # received 5000 times, planned once (twice where the epoch pads: 5001 then)
    assert {times for *_, times in epoch.duplicated} <= {5000, 5001} and not epoch.ok


def test_two_runs_from_the_same_point_are_named_not_counted_together(
    ledger: Path, tmp_path: Path, npz_root: Path
) -> None:
    """A run restarted from the epoch's start with another world size wrote beside the
    abandoned run's files, and the audit counted both: a correct epoch "duplicated"."""
    copy, _ = _copy(ledger, tmp_path)

    async def abandoned() -> None:  # 2 ranks that took a few batches, then were given up
        async with running_workers(npz_root, 1) as (worker,):
            for rank in range(2):
                async with Loader(
                    worker.address, dataset="train", batch_size=16, rank=rank, world_size=2,
                    remainder="pad", ledger_dir=str(copy),
                ) as loader:  # fmt: skip
                    it = loader.epoch(0)
                    for _ in range(3):
                        await it.__anext__()

    asyncio.run(abandoned())
    with pytest.raises(LedgerError, match="runs of 2 and of 3 ranks started this epoch"):
        list(audit(copy))


def test_an_empty_file_cannot_be_audited(ledger: Path, tmp_path: Path) -> None:
    copy, files = _copy(ledger, tmp_path)
    files[0].write_bytes(b"")  # killed before its header was written
    assert cli(["audit", str(copy)]) == 1
