"""A dataset's declared schema ([datasets.NAME.schema] in the worker's TOML file), and
manifests (`shardstream index --config`) of datasets with transforms.

A declared schema is what DescribeDataset reports; the worker refuses to start when
its transforms (or shards) give anything else, and every record read is checked
against it. A manifest pins the transforms: a worker whose chain differs from the
indexed one in any parameter refuses to start until the dataset is indexed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client.errors import DataLossError
from shardstream.server import DatasetSpec, Worker, WorkerConfig, make_dataset
from shardstream.server._catalog import CatalogError
from shardstream.server._configfile import load_config_file
from shardstream.server._process import WorkerProcess
from shardstream.v1.codec import FieldSpec

from conftest import SHAPE

TESTS = Path(__file__).parent
RECORDS = 32  # 2 shards of 16
T = "shardstream.server.transforms"
TRAIN = f"""
[datasets.train]
shards = "*.tar"
format = "wds"
transforms = [
  {{fn = "{T}:decode_image"}},
  {{fn = "{T}:random_resized_crop", size = 16}},
  {{fn = "{T}:horizontal_flip", p = 0.5}},
  {{fn = "{T}:to_float_chw", mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25]}},
]
"""
DECLARED = """
[datasets.train.schema]
image = {dtype = "float32", shape = [3, 16, 16]}
label = {dtype = "int64"}
id = {dtype = "int64", shape = []}
"""
TRAIN_SCHEMA = (
    FieldSpec(name="id", dtype="int64", shape=()),
    FieldSpec(name="image", dtype="float32", shape=(3, 16, 16)),
    FieldSpec(name="label", dtype="int64", shape=()),
)
OPTIONS: dict[str, Any] = {"batch_size": 8, "idle_timeout": 5.0, "backoff_base": 0.05}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("declared")
    make_dataset(root, shards=2, records=RECORDS, shape=(24, 32, 3), format="wds")
    return root


def config(root: Path, text: str) -> tuple[DatasetSpec, ...]:
    path = root / "workers.toml"
    path.write_text(f'data_root = "{root}"\n{text}')
    return load_config_file(path).datasets


@contextlib.asynccontextmanager
async def worker(
    root: Path, datasets: Sequence[DatasetSpec], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.syspath_prepend(str(TESTS))  # the helpers, for an in-process worker
    cfg = WorkerConfig(data_root=root, datasets=tuple(datasets), port=0, processes=0,
                       chunk_bytes=8 * 1024)  # fmt: skip
    async with Worker(cfg) as w:
        yield w.address


# -- the declared schema ---------------------------------------------------------------------


def test_a_declared_schema_is_read_as_field_specs(root: Path) -> None:
    ragged = (
        '\n[datasets.text]\nshards = "*.tar"\n[datasets.text.schema]\n'
        'caption = {dtype = "string"}\nboxes = {dtype = "float32", shape = [-1, 4]}\n'
    )
    (train, text) = config(root, TRAIN + DECLARED + ragged)
    assert train.schema == (
        FieldSpec(name="image", dtype="float32", shape=(3, 16, 16)),
        FieldSpec(name="label", dtype="int64", shape=()),
        FieldSpec(name="id", dtype="int64", shape=()),
    )
    assert text.schema == (
        FieldSpec(name="caption", dtype="string", shape=()),
        FieldSpec(name="boxes", dtype="float32", shape=(-1, 4)),
    )
    assert text.schema[1].ragged and not train.schema[0].ragged
    (undeclared,) = config(root, TRAIN)
    assert undeclared.schema is None


S = '[datasets.train]\nshards = "*.tar"\n[datasets.train.schema]\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (S + 'image = {dtype = "flaot32", shape = [3]}\n',
         r"datasets\.train\.schema\.image\.dtype: dtype 'flaot32' cannot travel on the wire; "
         r"supported: bool, .*float32"),
        (S + 'image = {dtype = "f4"}\n',
         r"datasets\.train\.schema\.image\.dtype: write 'float32' for 'f4'"),
        (S + 'image = {dtype = "object"}\n', r"datasets\.train\.schema\.image\.dtype: dtype"),
        (S + "image = {shape = [3]}\n",
         r'datasets\.train\.schema\.image\.dtype must name a dtype, e\.g\. "float32", got None'),
        (S + 'image = {dtype = "uint8", shape = [3, "x"]}\n',
         r"datasets\.train\.schema\.image\.shape must be a list of ints .*got \[3, 'x'\]"),
        (S + 'image = {dtype = "uint8", shape = 3}\n',
         r"datasets\.train\.schema\.image\.shape must be a list of ints"),
        (S + 'image = {dtype = "uint8", shape = [true]}\n',
         r"datasets\.train\.schema\.image\.shape must be a list of ints"),
        (S + 'image = {dtype = "uint8", shape = [3, -1]}\n',
         r"datasets\.train\.schema\.image: field 'image': shape must be non-negative but for a "
         r"first dimension of -1 \(ragged\), got \(3, -1\)"),
        (S + 'image = {dtype = "uint8", shape = [-2]}\n',
         r"datasets\.train\.schema\.image: .*shape must be non-negative"),
        (S + 'caption = {dtype = "string", shape = [4]}\n',
         r"datasets\.train\.schema\.caption: field 'caption': a string field holds one value "
         r"per record, its shape must be \(\), got \(4,\)"),
        (S + 'image = {dtype = "uint8", shap = [3]}\n',
         r"unknown key datasets\.train\.schema\.image\.shap \(known: dtype, shape\)"),
        (S + 'image = "uint8"\n',
         r'datasets\.train\.schema\.image must be a table like \{dtype = "float32", shape = '
         r"\[3, 224, 224\]\}, got 'uint8'"),
        ('[datasets.train]\nshards = "*.tar"\nschema = []\n',
         r"datasets\.train\.schema must be a table of one or more fields"),
        ('[datasets.train]\nshards = "*.tar"\nschema = {}\n',
         r"datasets\.train\.schema must be a table of one or more fields"),
    ],
)  # fmt: skip
def test_schema_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_config_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


async def test_describe_reports_the_declared_schema_and_batches_read(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with worker(root, config(root, TRAIN + DECLARED), monkeypatch) as address:
        async with Loader([address], dataset="train", **OPTIONS) as loader:
            assert loader.schema == TRAIN_SCHEMA
            batches = [b async for b in loader.epoch(0)]
    assert len(batches) == RECORDS // 8
    assert all(b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == np.float32
               for b in batches)  # fmt: skip
    assert np.array_equal(np.sort(np.concatenate([b["id"] for b in batches])), np.arange(RECORDS))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('image = {dtype = "float32", shape = [3, 224, 224]}\nlabel = {dtype = "int64"}\n'
         'id = {dtype = "int64"}\n',
         r"field 'image' declared float32\[3x224x224\], found float32\[3x16x16\]; fix the "
         r"declaration \(\[datasets\.train\.schema\] in the --config file\) or the transforms"),
        ('image = {dtype = "uint8", shape = [3, 16, 16]}\nlabel = {dtype = "int64"}\n'
         'id = {dtype = "int64"}\n',
         r"field 'image' declared uint8\[3x16x16\], found float32\[3x16x16\]"),
        ('image = {dtype = "float32", shape = [3, 16, 16]}\nid = {dtype = "int64"}\n'
         'weight = {dtype = "float32"}\n',
         r"field 'label' found int64\[scalar\], not declared; field 'weight' declared "
         r"float32\[scalar\], not found"),
    ],
)  # fmt: skip
async def test_a_worker_whose_transforms_disagree_with_the_declaration_refuses_to_start(
    root: Path, monkeypatch: pytest.MonkeyPatch, fields: str, message: str
) -> None:
    specs = config(root, TRAIN + "[datasets.train.schema]\n" + fields)
    with pytest.raises(CatalogError, match=message) as info:
        async with worker(root, specs, monkeypatch):
            pass
    assert str(info.value).startswith(
        "dataset 'train': its declared schema is not what its transforms give on record 0 of "
        "shard 'shard-00000.tar': "
    )


async def test_a_record_off_the_declared_schema_is_data_loss_naming_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = config(root, f"""
[datasets.train]
shards = "*.tar"
transforms = [
  {{fn = "{T}:decode_image"}},
  {{fn = "{T}:center_crop", size = 16}},
  {{fn = "pipeline_helpers:uneven", at = 20}},
]
[datasets.train.schema]
image = {{dtype = "uint8", shape = [16, 16, 3]}}
extra = {{dtype = "float32", shape = [2]}}
label = {{dtype = "int64"}}
id = {{dtype = "int64"}}
""")  # fmt: skip
    async with worker(root, specs, monkeypatch) as address:
        with pytest.raises(DataLossError) as info:
            async with Loader([address], dataset="train", **OPTIONS) as loader:
                async for _ in loader.epoch(0):
                    pass
    text = str(info.value)
    assert (
        "transform pipeline_helpers:uneven gave field 'extra' as float32[3] at record 4, where "
        "the dataset's schema (declared) says extra:float32[2]" in text
    ), text
    assert "dataset 'train'" in text and "shard-00001.tar" in text


async def test_a_declared_ragged_field_takes_a_transform_output_of_any_length(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found on one record, `tokens` would be int32[1] and the next record off it; declared
    ragged, it is served ragged, each record with its own length."""
    chain = f"""
[datasets.train]
shards = "*.tar"
transforms = [
  {{fn = "{T}:decode_image"}},
  {{fn = "{T}:center_crop", size = 8}},
  {{fn = "pipeline_helpers:varying"}},
]
"""
    declared = """
[datasets.train.schema]
image = {dtype = "uint8", shape = [8, 8, 3]}
tokens = {dtype = "int32", shape = [-1]}
label = {dtype = "int64"}
id = {dtype = "int64"}
"""
    async with worker(root, config(root, chain + declared), monkeypatch) as address:
        async with Loader([address], dataset="train", **OPTIONS) as loader:
            fields = {f.name: f for f in loader.schema}
            assert fields["tokens"] == FieldSpec(name="tokens", dtype="int32", shape=(-1,))
            batches = [b async for b in loader.epoch(0)]
    for b in batches:
        for i, n, row in zip(b["id"], b["tokens_lengths"], b["tokens"], strict=True):
            assert n == i % 5 + 1
            assert row[:n].tolist() == list(range(n)) and not row[n:].any()
    assert sorted(np.concatenate([b["id"] for b in batches]).tolist()) == list(range(RECORDS))
    async with worker(root, config(root, chain), monkeypatch) as address:
        async with Loader([address], dataset="train", **OPTIONS) as loader:
            assert {f.name: f for f in loader.schema}["tokens"].shape == (1,)  # found
            with pytest.raises(DataLossError, match=r"gave field 'tokens' as int32\[2\] at "
                               r"record 1, where the dataset's schema \(found at start-up\)"):  # fmt: skip
                async for _ in loader.epoch(0):
                    pass


def npz_config(npz_root: Path, image: str) -> tuple[DatasetSpec, ...]:
    path = npz_root.parent / f"{npz_root.name}-plain.toml"
    path.write_text(
        '[datasets.plain]\nshards = "*.npz"\n[datasets.plain.schema]\n'
        f'id = {{dtype = "int64"}}\nlabel = {{dtype = "int64"}}\nimage = {image}\n'
    )
    try:
        return load_config_file(path).datasets
    finally:
        path.unlink()


async def test_a_dataset_without_transforms_is_checked_against_its_declaration(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = npz_config(npz_root, f'{{dtype = "uint8", shape = {list(SHAPE)}}}')
    async with worker(npz_root, good, monkeypatch) as address:
        async with Loader([address], dataset="plain", **OPTIONS) as loader:
            assert {f.name: f for f in loader.schema}["image"].shape == SHAPE
            assert (await anext(aiter(loader.epoch(0))))["image"].shape == (8, *SHAPE)
    bad = npz_config(npz_root, '{dtype = "uint8", shape = [-1, 3]}')  # ragged: not the shards'
    with pytest.raises(CatalogError, match=r"dataset 'plain': its declared schema is not what "
                       r"its shards have: field 'image' declared uint8\[\*x3\], found "
                       r"uint8\[4x4x3\]; .* or the shards"):  # fmt: skip
        async with worker(npz_root, bad, monkeypatch):
            pass


# -- manifests of datasets with transforms ---------------------------------------------------


def shardstream(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSTREAM_")}
    return subprocess.run([sys.executable, "-m", "shardstream.cli", *args],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


async def test_index_with_a_config_pins_the_transforms(root: Path, tmp_path: Path) -> None:
    cfg, manifest = tmp_path / "workers.toml", tmp_path / "manifest.json"
    cfg.write_text(f'data_root = "{root}"\n{TRAIN}')
    r = shardstream("index", "--config", str(cfg), "--cache-dir", "off", "-o", str(manifest))
    assert r.returncode == 0, r.stderr
    ds = json.loads(manifest.read_text())["datasets"]["train"]
    assert ds["format"] == "wds" and ds["records"] == RECORDS
    assert ds["schema"] == ["id:int64[scalar]", "image:float32[3x16x16]", "label:int64[scalar]"]
    assert [t["fn"].split(":")[1] for t in ds["transforms"]] == [
        "decode_image", "random_resized_crop", "horizontal_flip", "to_float_chw"]  # fmt: skip
    assert ds["transforms"][2] == {"fn": f"{T}:horizontal_flip", "p": 0.5}
    assert f'\n    {{"fn": "{T}:horizontal_flip", "p": 0.5}},\n' in manifest.read_text()  # a line

    worker_args = ["--config", str(cfg), "--manifest", str(manifest), "--processes", "0",
                   "--cache-dir", "off"]  # fmt: skip
    with WorkerProcess.start(worker_args) as w:
        async with Loader([w.address], dataset="train", **OPTIONS) as loader:
            assert loader.schema == TRAIN_SCHEMA
            batch = await anext(aiter(loader.epoch(0)))
            assert batch["image"].shape == (8, 3, 16, 16)

    # A parameter changed (the schema stays the same): refused, naming the step.
    cfg.write_text(f'data_root = "{root}"\n{TRAIN.replace("p = 0.5", "p = 0.2")}')
    r = shardstream("worker", *worker_args, "--port", "0")
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert (
        f"cannot serve: dataset 'train' differs from the manifest {manifest}: transforms[2] is "
        f'{{"fn":"{T}:horizontal_flip","p":0.2}} here, {{"fn":"{T}:horizontal_flip","p":0.5}} '
        "in the manifest (4 transforms here, 4 there); a manifest pins the transforms: index "
        "the dataset again with this configuration (`shardstream index --config FILE`)"
    ) in r.stderr, r.stderr

    # Indexed again with the new configuration, it is served.
    r = shardstream("index", "--config", str(cfg), "--cache-dir", "off", "-o", str(manifest))
    assert r.returncode == 0, r.stderr
    assert json.loads(manifest.read_text())["datasets"]["train"]["transforms"][2]["p"] == 0.2
    with WorkerProcess.start(worker_args) as w:
        async with Loader([w.address], dataset="train", **OPTIONS) as loader:
            assert loader.schema == TRAIN_SCHEMA


async def test_a_manifest_without_the_transforms_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest of the plain shards (or one written before manifests held transforms)
    does not vouch for a chain: the worker says which step it lacks."""
    manifest = tmp_path / "plain.json"
    r = shardstream("index", "--data-root", str(root), "--dataset", "train=*.tar:wds",
                    "--cache-dir", "off", "-o", str(manifest))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "transforms" not in json.loads(manifest.read_text())["datasets"]["train"]
    (spec,) = config(root, TRAIN)
    with pytest.raises(CatalogError, match=r"transforms\[0\] is \{\"fn\":\"shardstream\.server"
                       r"\.transforms:decode_image\"\} here, none in the manifest \(4 "
                       r"transforms here, 0 there\)"):  # fmt: skip
        async with worker(root, [replace(spec, manifest=manifest)], monkeypatch):
            pass
