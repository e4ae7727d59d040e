"""Pipelines on the workers: a decoder plus seeded transforms, configured in TOML.

Two datasets over the same WebDataset tars (generated JPEGs): `train` augments
(random resized crop, flip, normalise), `eval` resizes and center-crops. The
same (seed, epoch) gives byte-identical batches whatever the workers (1 or 3,
threads or decoding processes), after a worker is killed with SIGKILL mid-epoch
and after a resume from a state dict; another epoch gives other augmentations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client.errors import DataLossError, DatasetMismatchError
from shardstream.server import DatasetSpec, TransformSpec, Worker, WorkerConfig, make_dataset
from shardstream.server._configfile import load_config_file
from shardstream.server._pipelines import record_rng, shard_hash
from shardstream.server._process import WorkerProcess
from shardstream.v1.codec import FieldSpec

TESTS = Path(__file__).parent
RECORDS = 96
T = "shardstream.server.transforms"
CONFIG = f"""
[datasets.train]
shards = "*.tar"
format = "wds"
transforms = [
  {{fn = "{T}:decode_image", max_side = 40}},
  {{fn = "{T}:random_resized_crop", size = 16}},
  {{fn = "{T}:horizontal_flip", p = 0.5}},
  {{fn = "{T}:to_float_chw", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]}},
]

[datasets.eval]
shards = "*.tar"
format = "wds"
transforms = [
  {{fn = "{T}:decode_image"}},
  {{fn = "{T}:resize", size = 28}},
  {{fn = "{T}:center_crop", size = 24}},
]
"""
OPTIONS: dict[str, Any] = {
    "batch_size": 8,
    "seed": 5,
    "shuffle": True,
    "read_bytes": 16 * 1024,
    "chunk_bytes": 8 * 1024,
    "idle_timeout": 5.0,
    "keepalive_seconds": 1.0,
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
}
HELPERS_ENV = {
    "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipelines")
    make_dataset(root, shards=4, records=RECORDS, shape=(48, 64, 3), format="wds")
    (root / "workers.toml").write_text(f'data_root = "{root}"\n{CONFIG}')
    return root


def specs(root: Path) -> tuple[DatasetSpec, ...]:
    return load_config_file(root / "workers.toml").datasets


@contextlib.asynccontextmanager
async def workers(
    root: Path, n: int, datasets: Sequence[DatasetSpec] | None = None, processes: int = 0
) -> AsyncIterator[list[str]]:
    async with contextlib.AsyncExitStack() as stack:
        found = []
        for _ in range(n):
            config = WorkerConfig(
                data_root=root,
                datasets=tuple(datasets or specs(root)),
                port=0,
                processes=processes,
                chunk_bytes=8 * 1024,
            )
            found.append(await stack.enter_async_context(Worker(config)))
        yield [w.address for w in found]


async def epoch_batches(
    addresses: list[str], epoch: int, dataset: str = "train", **kw: Any
) -> list[dict[str, np.ndarray]]:
    async with Loader(addresses, dataset=dataset, **{**OPTIONS, **kw}) as loader:
        return [b async for b in loader.epoch(epoch)]


def assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


@pytest.fixture(scope="module")
def reference(root: Path) -> list[dict[str, np.ndarray]]:
    """Epoch 3 of `train` from one in-process worker decoding in threads."""
    import asyncio

    async def run() -> list[dict[str, np.ndarray]]:
        async with workers(root, 1) as addresses:
            return await epoch_batches(addresses, 3)

    return asyncio.run(run())


async def test_same_epoch_same_batches_with_1_or_3_workers(
    root: Path, reference: list[dict[str, np.ndarray]]
) -> None:
    assert len(reference) == RECORDS // 8
    ids = np.concatenate([b["id"] for b in reference])
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))
    async with workers(root, 3) as addresses:
        assert_same(await epoch_batches(addresses, 3), reference)
        other = await epoch_batches(addresses, 4)
    # Another epoch: other augmentations of the same records (and another order).
    by_id = {int(i): im for b in reference for i, im in zip(b["id"], b["image"], strict=True)}
    later = {int(i): im for b in other for i, im in zip(b["id"], b["image"], strict=True)}
    assert sorted(by_id) == sorted(later)
    differ = sum(not np.array_equal(by_id[i], later[i]) for i in by_id)
    assert differ > RECORDS * 0.9


async def test_records_are_augmented_by_position_not_by_reader(root: Path) -> None:
    """Without shuffle, the same record gets the same augmentation under another batch
    size and chunking (another split into reads and chunks)."""
    async with workers(root, 1) as addresses:
        a = await epoch_batches(addresses, 0, shuffle=False)
        b = await epoch_batches(
            addresses, 0, shuffle=False, batch_size=6, read_bytes=4 * 1024, chunk_bytes=4 * 1024
        )
    assert np.concatenate([x["image"] for x in a]).tobytes() == (
        np.concatenate([x["image"] for x in b]).tobytes()
    )


async def test_eval_pipeline_is_deterministic_and_shares_the_shards(root: Path) -> None:
    async with workers(root, 1) as addresses:
        e0 = await epoch_batches(addresses, 0, dataset="eval", shuffle=False)
        e1 = await epoch_batches(addresses, 1, dataset="eval", shuffle=False)
    assert_same(e0, e1)  # no randomness: every epoch the same pixels
    assert e0[0]["image"].shape == (8, 24, 24, 3) and e0[0]["image"].dtype == np.uint8


async def test_schema_and_fingerprint_come_from_the_pipeline(root: Path) -> None:
    async with workers(root, 1) as addresses:
        async with Loader(addresses, dataset="train", batch_size=8) as train:
            async with Loader(addresses, dataset="eval", batch_size=8) as evaluation:
                assert train.schema == (
                    FieldSpec(name="id", dtype="int64", shape=()),
                    FieldSpec(name="image", dtype="float32", shape=(3, 16, 16)),
                    FieldSpec(name="label", dtype="int64", shape=()),
                )
                assert dict((f.name, f) for f in evaluation.schema)["image"] == FieldSpec(
                    name="image", dtype="uint8", shape=(24, 24, 3)
                )
                assert train.dataset.fingerprint != evaluation.dataset.fingerprint
                batch = await anext(aiter(train.epoch(0)))
                assert batch["image"].shape == (8, 3, 16, 16)


async def test_workers_with_other_transforms_under_one_name_are_refused(root: Path) -> None:
    (train, _) = specs(root)
    flipped = (*train.transforms[:2], TransformSpec(fn=f"{T}:horizontal_flip", params={"p": 0.2}),
               train.transforms[3])  # fmt: skip
    other = DatasetSpec(name="train", pattern="*.tar", format="wds", transforms=flipped)
    async with workers(root, 1) as (a,), workers(root, 1, [other]) as (b,):
        with pytest.raises(DatasetMismatchError, match="disagree on dataset 'train'"):
            async with Loader([a, b], dataset="train", batch_size=8):
                pass


async def test_a_failing_transform_is_data_loss_naming_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))  # the helpers, for in-process workers
    failing = DatasetSpec(
        name="train",
        pattern="*.tar",
        format="wds",
        transforms=(
            TransformSpec(fn="pipeline_helpers:explode", params={"at": 37}),
            TransformSpec(fn=f"{T}:decode_image"),
            TransformSpec(fn=f"{T}:center_crop", params={"size": 16}),
        ),
    )
    async with workers(root, 1, [failing]) as addresses:
        with pytest.raises(DataLossError) as info:
            await epoch_batches(addresses, 0, shuffle=False)
        text = str(info.value)
        assert "pipeline_helpers:explode raised ValueError: cannot handle record id 37" in text
        assert "dataset 'train'" in text and "shard-00001.tar" in text and "record 13" in text
        skipped = await epoch_batches(addresses, 0, shuffle=False, on_error="skip", drop_last=False)
        ids = np.concatenate([b["id"] for b in skipped])
        assert 37 not in ids and len(ids) >= RECORDS - 8


@pytest.mark.parametrize("processes", [0, 1])
@pytest.mark.parametrize("how", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
async def test_a_transform_that_exits_is_data_loss_not_a_dead_fleet(
    root: Path, monkeypatch: pytest.MonkeyPatch, how: str, processes: int
) -> None:
    """`sys.exit()` (or KeyboardInterrupt, GeneratorExit) raised by a transform on one
    record. Was: the worker (or its decoding process) died on it, the read moved to the
    next worker, which died too: WorkersUnavailableError once the fleet was gone, and
    on_error="skip" could not help. Now it is that record's DATA_LOSS, like any other
    exception of a transform."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # for decoding processes
    leaving = DatasetSpec(
        name="train",
        pattern="*.tar",
        format="wds",
        transforms=(
            TransformSpec(fn="pipeline_helpers:leave", params={"at": 37, "how": how}),
            TransformSpec(fn=f"{T}:decode_image"),
            TransformSpec(fn=f"{T}:center_crop", params={"size": 16}),
        ),
    )
    async with workers(root, 2, [leaving], processes=processes) as addresses:
        with pytest.raises(DataLossError, match=f"pipeline_helpers:leave raised {how}"):
            await epoch_batches(addresses, 0, shuffle=False)
        skipped = await epoch_batches(addresses, 0, shuffle=False, on_error="skip", drop_last=False)
        ids = np.concatenate([b["id"] for b in skipped])
        assert 37 not in ids and len(ids) >= RECORDS - 8  # both workers still serve


async def test_a_transform_off_its_schema_is_data_loss_naming_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    uneven = DatasetSpec(
        name="train",
        pattern="*.tar",
        format="wds",
        transforms=(
            TransformSpec(fn=f"{T}:decode_image"),
            TransformSpec(fn="pipeline_helpers:uneven", params={"at": 50}),
        ),
    )
    async with workers(root, 1, [uneven]) as addresses:
        with pytest.raises(DataLossError, match=r"pipeline_helpers:uneven gave field 'extra' as "
                           r"float32\[3\] at record 2, where .*extra:float32\[2\]"):  # fmt: skip
            await epoch_batches(addresses, 0, shuffle=False)


async def test_a_transform_giving_a_string_without_utf8_is_data_loss_naming_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: UnicodeEncodeError escaped the worker as UNKNOWN, which clients retry: the
    epoch stalled until the retry deadline and ended in WorkersUnavailableError."""
    monkeypatch.syspath_prepend(str(TESTS))
    captioned = DatasetSpec(
        name="train",
        pattern="*.tar",
        format="wds",
        transforms=(TransformSpec(fn="pipeline_helpers:caption", params={"at": 37}),),
    )
    async with workers(root, 1, [captioned]) as addresses:
        with pytest.raises(DataLossError) as info:
            await epoch_batches(addresses, 0, shuffle=False, retry_deadline=5.0)
    err = info.value
    assert (err.shard, err.record) == ("shard-00001.tar", 13)
    assert "pipeline_helpers:caption gave field 'caption' a string that has no UTF-8" in str(err)


def test_the_generator_is_a_function_of_seed_epoch_shard_and_index() -> None:
    draw = [
        record_rng(5, e, shard_hash("shard-00000.tar"), i).random() for e in (0, 1) for i in (0, 1)
    ]
    assert len(set(draw)) == 4
    assert record_rng(5, 0, shard_hash("shard-00000.tar"), 1).random() == draw[1]
    assert shard_hash("shard-00000.tar") == shard_hash("shard-00000.tar") != shard_hash("x")


@contextlib.contextmanager
def worker_fleet(root: Path, n: int) -> Iterator[list[WorkerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                WorkerProcess.start(
                    ["--config", str(root / "workers.toml"), "--processes", "1",
                     "--chunk-bytes", "8192", "--cache-dir", "off"],
                    env=HELPERS_ENV,
                )
            )
            for _ in range(n)
        ]  # fmt: skip


async def test_kill_9_mid_epoch_and_resume_give_the_same_batches(
    root: Path, reference: list[dict[str, np.ndarray]]
) -> None:
    with worker_fleet(root, 3) as fleet:
        addresses = [w.address for w in fleet]
        victim = fleet[1]
        got: list[dict[str, np.ndarray]] = []
        killed = False
        async with Loader(addresses, dataset="train", **{**OPTIONS, "retry_deadline": 30.0}) as ld:
            async for batch in ld.epoch(3):
                got.append(batch)
                if not killed and ld.statistics().reads_in_flight.get(victim.address, 0):
                    victim.signal(signal.SIGKILL)
                    killed = True
                if len(got) == 5:
                    state = ld.state_dict()
        assert killed, "no read was in flight on the victim"
        assert victim.proc.wait(10) == -signal.SIGKILL
        assert_same(got, reference)
        live = [w.address for w in fleet if w is not victim]
        async with Loader(live, dataset="train", **OPTIONS, state=state) as resumed:
            rest = [b async for b in resumed.epoch(3)]
        assert_same(rest, reference[5:])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[datasets.train]\nshards = "*.tar"\nshardz = 1\n',
         r"unknown key datasets\.train\.shardz \(known: shards, format, transforms, schema\)"),
        ("port = 5\n", r"unknown key port .*flags or SHARDSTREAM_\*"),
        ('[datasets.train]\nformat = "wds"\n', r"datasets\.train\.shards must be a glob"),
        ('[datasets.train]\nshards = "*.tar"\ntransforms = [{fn = "nocolon"}]\n',
         r'datasets\.train\.transforms\[0\]: a transform is named "module:function"'),
        ('[datasets.train]\nshards = "*.tar"\ntransforms = [{fn = "no.such.module:f"}]\n',
         r"datasets\.train\.transforms\[0\]: cannot load transform 'no\.such\.module:f'"),
        (f'[datasets.train]\nshards = "*.tar"\ntransforms = [{{fn = "{T}:decode_image"}}, '
         f'{{fn = "{T}:resize", size = 3, sise = 3}}]\n',
         r"datasets\.train\.transforms\[1\]: transform .*:resize' does not take these "
         r"parameters \(got an unexpected keyword argument 'sise'\)"),
        ('[datasets.train]\nshards = "*.tar"\ntransforms = [{fn = "a:b", rng = 1}]\n',
         r"datasets\.train\.transforms\[0\]: transform a:b: parameter\(s\) \['rng'\] are taken"),
        ('[datasets.train\nshards = "*.tar"\n', r"is not valid TOML: .*line 1"),
    ],
)  # fmt: skip
def test_config_file_errors_are_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_config_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_the_worker_command_reports_a_config_error_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[datasets.train]\nshards = "*.tar"\nshardz = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "shardstream.server", "--config", str(path), "--data-root",
         str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SHARDSTREAM_CONFIG": ""},
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key datasets.train.shardz" in lines[0], proc.stderr


def test_another_version_of_a_transform_is_another_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dataset's fingerprint covers each transform's source code, not only its name
    and parameters: a fleet in a rolling upgrade whose workers run two versions of
    `brighten` refuses to mix them (and a state saved under one refuses the other).
    Was: the fleet was accepted, and half of each epoch came from each version."""
    from shardstream.server import _pipelines
    from shardstream.server._pipelines import code_text

    module = tmp_path / "rt_version_aug.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = TransformSpec(fn="rt_version_aug:brighten", params={"amount": 5})

    def digest(body: str, constant: int = 5) -> str:
        module.write_text(
            f"SIGMA = {constant}\n\ndef brighten(record, rng, *, amount):\n    {body}\n"
        )
        monkeypatch.delitem(sys.modules, "rt_version_aug", raising=False)
        monkeypatch.setattr(_pipelines, "_loaded", {})
        return code_text((spec,))

    v1 = digest("return record")
    assert digest("record['image'] = record['image'] + amount; return record") != v1
    assert digest("return record") == v1  # the same code: the same fingerprint
    # A constant (or helper) of the module the function reads: another version too. Was:
    # the function's own source only, so SIGMA 5 and 50 mixed in one fleet.
    assert digest("return record", constant=50) != v1


def test_a_resize_that_would_pass_the_pixel_limit_is_refused_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """resize(256) of a 2 x 6000 image (36 KB as PNG, far under the pixel limit) makes
    256 x 768000: 1.9 GB peak in a decoding process for one record. Now refused first."""
    from shardstream.server import transforms
    from shardstream.server.errors import DecodeError

    rng = np.random.default_rng(0)
    thin = {"image": np.zeros((2, 6000, 3), np.uint8)}
    with pytest.raises(DecodeError, match=r"to 256 x 768000 would make 196608000 pixels"):
        transforms.resize(dict(thin), rng, size=256)
    monkeypatch.setenv("SHARDSTREAM_MAX_IMAGE_PIXELS", str(10**9))  # the limit is the rule
    wide = {"image": np.zeros((2, 600, 3), np.uint8)}
    assert transforms.resize(dict(wide), rng, size=8)["image"].shape == (8, 2400, 3)


@pytest.mark.parametrize(
    ("fn", "params"),
    [
        ("to_float_chw", {"mean": [float("nan")] * 3}),
        ("to_float_chw", {"std": [float("inf")] * 3}),
        ("to_float_chw", {"scale": float("nan")}),
        ("random_resized_crop", {"size": 8, "scale": [0.5, float("inf")]}),
        ("random_resized_crop", {"size": 8, "ratio": [float("nan"), 1.0]}),
    ],
)
def test_parameters_that_are_not_finite_are_refused(fn: str, params: dict[str, Any]) -> None:
    """Was: accepted; a NaN mean made every pixel NaN, an infinite std every pixel 0, an
    infinite scale an OverflowError on every record."""
    from shardstream.server import transforms

    record = {"image": np.zeros((16, 16, 3), np.uint8)}
    with pytest.raises(ValueError, match=r"finite|must be"):
        getattr(transforms, fn)(record, np.random.default_rng(0), **params)


async def test_a_transform_drawing_from_a_global_generator_is_refused_at_start_up(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: served, and two runs with the same seed and epoch differed in 127 of 130
    records, silently. The chain now runs twice on record 0 at start-up."""
    from shardstream.server.errors import CatalogError

    monkeypatch.syspath_prepend(str(TESTS))
    noisy = DatasetSpec(
        name="train", pattern="*.tar", format="wds",
        transforms=(TransformSpec(fn="pipeline_helpers:global_noise"),),
    )  # fmt: skip
    with pytest.raises(CatalogError, match="global_noise gave field 'noise' of record 0 diff"):
        async with workers(root, 1, [noisy]):
            pass
