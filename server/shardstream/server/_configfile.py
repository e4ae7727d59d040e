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

    [datasets.train.schema]                  # optional: the fields the records have
    image = {dtype = "uint8", shape = [224, 224, 3]}
    label = {dtype = "int64"}                # shape [] (a scalar) unless given
    caption = {dtype = "string"}             # "string" / "bytes": one per record
    boxes = {dtype = "float32", shape = [-1, 4]}   # -1 first: ragged (any number)

Each transform is a table with `fn` ("module:function") and its parameters; it
is imported and its parameters checked against its signature here, so a typo
is a start-up error. The decoders are imported here too, and `check_formats`
(once --decoder plug-ins are loaded as well) checks each dataset's format. A
declared schema is checked against what the transforms (or the decoder) give
when the worker starts, and every record against it when read (`_catalog`);
dtypes are numpy's names. Every error is one line naming the file and the key.
Worker settings (port, processes, TLS, ...) stay flags and SHARDSTREAM_*
variables; datasets given with --dataset are served besides the file's. What
the file sets wins over SHARDSTREAM_DATA_ROOT, SHARDSTREAM_DATASETS and
SHARDSTREAM_DECODERS (a --data-root flag wins over the file; see `cli`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardstream.server._config import DatasetSpec, TransformSpec
from shardstream.server._decoders import decoder_class, load_decoder, register_decoder
from shardstream.server._pipelines import check_transform
from shardstream.v1.codec import TEXT_DTYPES, FieldSpec, dtype_code

__all__ = ["ConfigFile", "check_formats", "load_config_file"]

_TOP = ("data_root", "decoders", "datasets")
_DATASET = ("shards", "format", "transforms", "schema")
_FIELD = ("dtype", "shape")
_FIELD_EXAMPLE = '{dtype = "float32", shape = [3, 224, 224]}'


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigFile:
    """What a configuration file sets."""

    path: str  # the file, as named on the command line (error messages name it)
    data_root: str | None  # None: not set (--data-root then)
    datasets: tuple[DatasetSpec, ...]
    decoders: tuple[str, ...]  # imported and registered (`register_decoder`) when loaded


def load_config_file(path: Path) -> ConfigFile:
    """Read and check a configuration file; ValueError (one line, naming the file and
    the key) when it cannot be used."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the configuration {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 (a UTF-16 file from an editor is not)
        raise ValueError(
            f"{path} is not valid TOML: not UTF-8 text (byte {exc.start}: "
            f"{exc.object[exc.start : exc.start + 1]!r}); save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return _parse(doc, str(path))


def check_formats(file: ConfigFile) -> None:
    """ValueError (naming the file and the key) unless every format the file's datasets
    name is registered; call it once every plug-in format (--decoder) is loaded."""
    for spec in file.datasets:
        if spec.format is not None:
            try:
                decoder_class(spec.format)
            except ValueError as exc:
                raise ValueError(f"{file.path}: datasets.{spec.name}.format: {exc}") from None


def _parse(doc: dict[str, Any], where: str) -> ConfigFile:
    _known(doc, _TOP, where, "", "worker settings such as the port are flags or SHARDSTREAM_*")
    root = doc.get("data_root")
    if root is not None and (not isinstance(root, str) or not root):
        raise ValueError(f"{where}: data_root must be a non-empty string, got {root!r}")
    decoders = doc.get("decoders", [])
    if not isinstance(decoders, list) or not all(isinstance(d, str) for d in decoders):
        raise ValueError(f'{where}: decoders must be a list of "module:Class" strings')
    for i, ref in enumerate(decoders):
        _decoder(ref, where, f"decoders[{i}]")
    tables = doc.get("datasets", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: datasets must be tables, e.g. [datasets.train]")
    datasets = tuple(_dataset(name, t, where) for name, t in tables.items())
    return ConfigFile(path=where, data_root=root, datasets=datasets, decoders=tuple(decoders))


def _decoder(ref: str, where: str, at: str) -> None:
    """Import and register a plug-in decoder, so a typo is a start-up error naming the key."""
    module, colon, name = ref.partition(":")
    if not (module and colon and name):
        raise ValueError(f'{where}: {at} must be "module:Class", got {ref!r}')
    try:
        register_decoder(type(load_decoder(ref)))
    except Exception as exc:  # its module's import or the class's __init__: the user's code
        raise ValueError(f"{where}: {at}: cannot load decoder {ref!r}: {exc}") from None


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
    schema = None if "schema" not in table else _schema(table["schema"], where, f"{at}.schema")
    try:
        return DatasetSpec(
            name=name, pattern=shards, format=fmt, transforms=transforms, schema=schema
        )
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


def _schema(table: Any, where: str, at: str) -> tuple[FieldSpec, ...]:
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f"{where}: {at} must be a table of one or more fields ([{at}] then lines like "
            f"image = {_FIELD_EXAMPLE}), got {table!r}"
        )
    return tuple(_field(name, spec, where, f"{at}.{name}") for name, spec in table.items())


def _field(name: str, spec: Any, where: str, at: str) -> FieldSpec:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: {at} must be a table like {_FIELD_EXAMPLE}, got {spec!r}")
    _known(spec, _FIELD, where, f"{at}.", "")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str):
        raise ValueError(f'{where}: {at}.dtype must name a dtype, e.g. "float32", got {dtype!r}')
    try:
        dtype_code(dtype)
        canonical = dtype if dtype in TEXT_DTYPES else np.dtype(dtype).name
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {at}.dtype: {exc}") from None
    if canonical != dtype:
        raise ValueError(f"{where}: {at}.dtype: write {canonical!r} for {dtype!r}")
    shape = spec.get("shape", [])
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ValueError(
            f"{where}: {at}.shape must be a list of ints ([] for a scalar, -1 first for a "
            f"ragged field), got {shape!r}"
        )
    try:
        return FieldSpec(name=name, dtype=dtype, shape=tuple(shape))
    except ValueError as exc:
        raise ValueError(f"{where}: {at}: {exc}") from None
