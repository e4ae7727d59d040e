"""A state describes exactly what the caller has received, on every path (`Loader`,
`SyncLoader`, the torch iterable), whatever the prefetch depth and consumer speed;
resuming from it in a fresh process yields exactly the rest."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client._sync import HANDOFF_BATCHES

from conftest import RECORDS, ids_of, running_workers, worker_processes

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sync_consumer import OPTIONS  # noqa: E402

BATCHES = RECORDS // OPTIONS["batch_size"]
STOPS = (1, 13, BATCHES - 1)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _first_part(address: str, path: str, stop: int, slow: bool) -> tuple[list[int], dict[str, Any]]:
    """Take `stop` batches; a slow consumer lets the loader run as far ahead as its
    buffers allow before saving the state."""
    got: list[int] = []
    if path == "sync":
        sync = SyncLoader([address], **OPTIONS)
        sync.open()
        batches: Iterator[dict[str, np.ndarray]] = sync.epoch(0)
        close = sync.close
    else:
        import torch

        from shardstream.client.torch import ShardstreamIterable

        data = ShardstreamIterable([address], **OPTIONS)
        batches = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=0))
        sync, close = data._loader, data.close
    try:
        for _ in range(stop):
            got += np.asarray(next(batches)["id"]).tolist()
        if slow:
            current = sync._loader._current
            assert current is not None
            ahead = min(BATCHES, stop + HANDOFF_BATCHES)  # what the hand-off holds
            _wait_until(lambda: current.counters.batches >= ahead, "the loader to run ahead")
            assert current.counters.batches > stop  # the state must not count these
        state = sync.state_dict() if path == "sync" else data.state_dict()
    finally:
        close()
    return got, state


def _rest_in_a_fresh_process(
    address: str, path: str, state: dict[str, Any], tmp_path: Path
) -> list[int]:
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    out = subprocess.run(
        [sys.executable, str(HERE / "sync_consumer.py"), address, path, str(state_file)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rest: list[int] = json.loads(out.stdout)
    return rest


PATHS = ["sync"] + (["torch"] if importlib.util.find_spec("torch") else [])


@pytest.mark.parametrize("path", PATHS)
def test_resume_from_the_state_is_exactly_the_rest(
    npz_root: Path, tmp_path: Path, path: str
) -> None:
    with worker_processes(npz_root, 1) as (worker,):
        for stop in STOPS:
            for slow in (False, True):
                first, state = _first_part(worker.address, path, stop, slow)
                assert state["epoch"] == 0 and state["batches"] == stop, (stop, slow, state)
                rest = _rest_in_a_fresh_process(worker.address, path, state, tmp_path)
                both = np.array(first + rest)
                assert len(first) == stop * OPTIONS["batch_size"]
                assert np.array_equal(np.sort(both), np.arange(RECORDS)), (stop, slow)


def test_state_after_the_last_batch_points_at_the_next_epoch(npz_root: Path) -> None:
    with (
        worker_processes(npz_root, 1) as (worker,),
        SyncLoader([worker.address], **OPTIONS) as sync,
    ):
        batches = list(sync.epoch(0))
        assert len(batches) == BATCHES
        state = sync.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 0)


async def test_async_loader_state_counts_the_batches_returned(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as workers:
        async with Loader([workers[0].address], **OPTIONS) as loader:
            epoch = loader.epoch(0)
            got = [await anext(epoch) for _ in range(5)]
            assert loader.state_dict()["batches"] == 5
            await epoch.aclose()
            state = loader.state_dict()
        async with Loader([workers[0].address], state=state, **OPTIONS) as loader:
            rest = [b async for b in loader.epoch(loader.start_epoch)]
            stats = loader.statistics().epochs[0]  # per epoch: is input the bottleneck?
    assert stats.completed and stats.batches == len(rest) == BATCHES - 5
    assert 0 <= stats.wait_seconds <= stats.seconds and 0 <= stats.wait_fraction <= 1
    ids = ids_of(got + rest)
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))
