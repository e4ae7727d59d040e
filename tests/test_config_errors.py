"""Options and states that cannot work are refused up front, precisely: a `ConfigError`
naming the option, its value and what it accepts; a `StateMismatchError` for a state past
its epoch's end; and a state of ten million ranks resumes at once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, LoaderConfig, PlanOptions, plan_epoch
from shardstream.client.errors import ConfigError, StateMismatchError

from conftest import RECORDS, collect_epoch, running_workers

BAD = [
    ({"batch_size": "64"}, "batch_size must be a positive int, got '64'"),
    ({"batch_size": 64.0}, "batch_size must be a positive int, got 64.0"),
    ({"batch_size": True}, "batch_size must be a positive int, got True"),
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"world_size": 2, "rank": 0.5}, r"rank must be an int in \[0, world_size=2\), got 0.5"),
    ({"world_size": 2, "rank": 2}, r"rank must be in \[0, world_size=2\), got 2"),
    ({"world_size": "8", "rank": 0}, "world_size must be a positive int, got '8'"),
    ({"seed": 2**70}, r"seed must be in \[0, 2\*\*64\), got 1180591620717411303424"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*64\), got -1"),
    ({"seed": 1.5}, r"seed must be an int in \[0, 2\*\*64\), got 1.5"),
    ({"shuffle": "yes"}, "shuffle must be True or False, got 'yes'"),
    ({"shuffle": 1}, "shuffle must be True or False, got 1"),
    ({"drop_last": "no"}, "drop_last must be True or False, got 'no'"),
    ({"tune_malloc": None}, "tune_malloc must be True or False, got None"),
    ({"shuffle": True, "shuffle_window": 2.5}, "shuffle_window must be an int >= 0, got 2.5"),
    ({"shuffle": True, "shuffle_window": -2}, "shuffle_window must be >= 0, got -2"),
    ({"remainder": "wrap"}, "remainder must be 'drop' or 'pad', got 'wrap'"),
    ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip', got 'ignore'"),
    ({"read_bytes": "8MiB"}, "read_bytes must be a positive int, got '8MiB'"),
    ({"reads_ahead": None}, "reads_ahead must be a positive int, got None"),
    ({"max_message_bytes": 2**31}, r"max_message_bytes must be in \[1, 2147483647\]"),
    ({"idle_timeout": "30"}, "idle_timeout must be a positive, finite number of seconds, got '30'"),
    ({"idle_timeout": True}, "idle_timeout must be a positive, finite number of seconds, got True"),
    ({"retry_deadline": float("inf")}, "retry_deadline must be a positive, finite number"),
    ({"describe_timeout": float("nan")}, "describe_timeout must be a positive, finite number"),
    ({"backoff_base": 0}, "backoff_base must be a positive, finite number of seconds, got 0"),
    ({"keepalive_seconds": 1e7}, "keepalive_seconds must be .*, at most 2147483, got 10000000"),
    ({"ledger_dir": 3}, "ledger_dir must be None or a folder"),
    ({"security": "tls"}, "security must be None or a ClientSecurity, got 'tls'"),
    ({"channel_options": "grpc.x=1"}, "channel_options must be .*, got 'grpc.x=1'"),
    ({"channel_options": (("grpc.x", 1.5),)}, "channel_options must be .*, got"),
    ({"channel_options": (("grpc.x", 1, 2),)}, "channel_options must be .*, got"),
    ({"dataset": 7}, "dataset must be a non-empty name .*, got 7"),
]  # fmt: skip


@pytest.mark.parametrize(("options", "match"), BAD, ids=[str(o) for o, _ in BAD])
def test_options_of_the_wrong_type_or_range_are_a_config_error(
    options: dict[str, Any], match: str
) -> None:
    kw: dict[str, Any] = {"dataset": "train", "batch_size": 8, **options}
    with pytest.raises(ConfigError, match=match):
        LoaderConfig(**kw)
    with pytest.raises(ConfigError, match=match):
        Loader(["127.0.0.1:1"], **kw)


def test_numpy_numbers_are_accepted_as_plain_ones() -> None:
    config = LoaderConfig(
        dataset="train", batch_size=np.int64(8), world_size=np.int32(4), rank=np.int64(3),
        seed=np.uint64(2**64 - 1), idle_timeout=np.float32(2.5), channel_options=[["grpc.x", 1]],
    )  # fmt: skip
    assert (config.batch_size, config.world_size, config.rank) == (8, 4, 3)
    assert type(config.batch_size) is int and type(config.idle_timeout) is float
    assert config.channel_options == (("grpc.x", 1),)
    json.dumps(config.plan_dict())  # states and ledgers hold these
    hash(config)


def test_plan_options_refuse_a_seed_the_wire_cannot_carry() -> None:
    plan_epoch([10], epoch=0, rank=0, world_size=1, read_records=4,
               options=PlanOptions(batch_size=2, seed=2**64 - 1))  # fmt: skip
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        PlanOptions(batch_size=2, seed=2**64)


async def _state(address: str, consumed: int, **options: Any) -> dict[str, Any]:
    async with Loader([address], dataset="train", **options) as loader:
        epoch = loader.epoch(0)
        for _ in range(consumed):
            await anext(epoch)
        state = loader.state_dict()
        await epoch.aclose()
    return state


async def test_a_state_past_the_end_of_its_epoch_is_refused(npz_root: Path) -> None:
    """Was: an empty epoch, silently."""
    async with running_workers(npz_root, 1) as (worker,):
        opts = {"batch_size": 100, "world_size": 2, "rank": 1}
        state = await _state(worker.address, 3, **opts)
        batches = RECORDS // 2 // 100
        past = {**state, "batches": batches + 1}
        match = (
            f"says {batches + 1} batches of epoch 0 were consumed .* but the epoch has {batches}"
        )
        with pytest.raises(StateMismatchError, match=match):
            async with Loader([worker.address], dataset="train", state=past, **opts):
                pass
        # Elastic: an earlier interruption past the end of its epoch.
        history = {**state, "history": [[2, batches + 5]], "world_size": 4, "rank": 0}
        with pytest.raises(StateMismatchError, match=f"says {batches + 5} batches"):
            async with Loader([worker.address], dataset="train", state=history, **opts):
                pass
        # A later epoch's state: refused when it is loaded too.
        later = {**past, "epoch": 2}
        with pytest.raises(StateMismatchError, match=r"of epoch 2 .* but the epoch has"):
            async with Loader([worker.address], dataset="train", state=later, **opts):
                pass
        # The epoch's very end is an empty rest, which is right.
        end = {**state, "batches": batches}
        async with Loader([worker.address], dataset="train", state=end, **opts) as loader:
            assert await collect_epoch(loader, 0) == []


async def test_a_pad_state_of_ten_million_ranks_resumes_at_once(npz_root: Path) -> None:
    """Was: a plan for each of the 10**7 ranks of the state, at start-up (hours)."""
    ws = 10**7
    opts = {"batch_size": 1, "remainder": "pad", "world_size": ws}
    async with running_workers(npz_root, 1) as (worker,):
        state = await _state(worker.address, 1, rank=ws - 1, **opts)
        # Every batch of the epoch received: the state points at the next epoch; the
        # same position said the other way (1 of epoch 0's 1 batch) must load too.
        assert (state["world_size"], state["epoch"], state["batches"]) == (ws, 1, 0)
        state = {**state, "epoch": 0, "batches": 1}
        t0 = time.perf_counter()
        for rank, world in ((ws - 1, ws), (0, ws), (2, 3)):  # the same, or another world size
            options = {**opts, "rank": rank, "world_size": world}
            async with Loader([worker.address], dataset="train", state=state, **options) as loader:
                assert loader.plan(0).batches == 0  # every rank had its one record
                assert await collect_epoch(loader, 0) == []
                assert loader.plan(1).batches == -(-RECORDS // world)
        assert time.perf_counter() - t0 < 10
