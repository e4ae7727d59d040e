"""The worker's configuration file (TOML, `--config FILE` / SHARDSTREAM_CONFIG).

    data_root = "/data"                      # optional if --data-root is given
    decoders = ["mypkg.formats:MyFormat"]    # optional: plug-in formats

    [datasets.train]
    shards = "imagenet/train-*.tar"          # glob under the data root
    format = "wds"                           # optional: from the files' suffix
    transforms = [                           # optional: per record, in order
      {fn = "shardstream.server.transforms:decode_image", max_side = 512},
      {fn = "shardstream.server.transforms:random_resized_crop", size = 224},
    ]

Each transform is a table with `fn` ("module:function") and its parameters; it
is imported and its parameters checked against its signature here, so a typo
is a start-up error. Every error is one line naming the file and the key.
Worker settings (port, processes, TLS, ...) stay flags and SHARDSTREAM_*
variables; datasets given with --dataset are served besides the file's.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardstream.server._config import DatasetSpec, TransformSpec
from shardstream.server._pipelines import check_transform

__all__ = ["ConfigFile", "load_config_file"]

_TOP = ("data_root", "decoders", "datasets")
_DATASET = ("shards", "format", "transforms")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigFile:
    """What a configuration file sets."""

    data_root: str | None  # None: not set (--data-root then)
    datasets: tuple[DatasetSpec, ...]
    decoders: tuple[str, ...]


def load_config_file(path: Path) -> ConfigFile:
    """Read and check a configuration file; ValueError (one line, naming the file and
    the key) when it cannot be used."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the configuration {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return _parse(doc, str(path))


def _parse(doc: dict[str, Any], where: str) -> ConfigFile:
    _known(doc, _TOP, where, "", "worker settings such as the port are flags or SHARDSTREAM_*")
    root = doc.get("data_root")
    if root is not None and (not isinstance(root, str) or not root):
        raise ValueError(f"{where}: data_root must be a non-empty string, got {root!r}")
    decoders = doc.get("decoders", [])
    if not isinstance(decoders, list) or not all(isinstance(d, str) for d in decoders):
        raise ValueError(f'{where}: decoders must be a list of "module:Class" strings')
    tables = doc.get("datasets", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: datasets must be tables, e.g. [datasets.train]")
    datasets = tuple(_dataset(name, t, where) for name, t in tables.items())
    return ConfigFile(data_root=root, datasets=datasets, decoders=tuple(decoders))


def _known(table: dict[str, Any], keys: tuple[str, ...], where: str, at: str, hint: str) -> None:
    for key in table:
        if key not in keys:
            more = f"; {hint}" if hint else ""
            raise ValueError(f"{where}: unknown key {at}{key} (known: {', '.join(keys)}){more}")


def _dataset(name: str, table: Any, where: str) -> DatasetSpec:
    at = f"datasets.{name}"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: {at} must be a table ([{at}]), got {table!r}")
    _known(table, _DATASET, where, f"{at}.", "")
    shards = table.get("shards")
    if not isinstance(shards, str):
        raise ValueError(f"{where}: {at}.shards must be a glob under the data root, got {shards!r}")
    fmt = table.get("format")
    if fmt is not None and (not isinstance(fmt, str) or not fmt):
        raise ValueError(f"{where}: {at}.format must be a format name, got {fmt!r}")
    steps = table.get("transforms", [])
    if not isinstance(steps, list):
        raise ValueError(f"{where}: {at}.transforms must be a list of tables, got {steps!r}")
    transforms = tuple(
        _transform(step, where, f"{at}.transforms[{i}]") for i, step in enumerate(steps)
    )
    try:
        return DatasetSpec(name=name, pattern=shards, format=fmt, transforms=transforms)
    except ValueError as exc:
        raise ValueError(f"{where}: {at}: {exc}") from None


def _transform(step: Any, where: str, at: str) -> TransformSpec:
    if not isinstance(step, dict):
        raise ValueError(
            f'{where}: {at} must be a table like {{fn = "module:function", ...}}, got {step!r}'
        )
    params = dict(step)
    fn = params.pop("fn", None)
    if not isinstance(fn, str):
        raise ValueError(f'{where}: {at}.fn must name the transform as "module:function"')
    try:
        spec = TransformSpec(fn=fn, params=params)
        check_transform(spec)
    except ValueError as exc:
        raise ValueError(f"{where}: {at}: {exc}") from None
    return spec
