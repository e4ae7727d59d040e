"""Manifests: what a dataset's shards must be, as `shardstream index` found them.

    {
      "shardstream_manifest": 1,
      "digest": "xxh3_128",
      "datasets": {
        "train": {
          "format": "npz",
          "schema": ["image:uint8[32x32x3]", "label:int64[scalar]"],
          "records": 100000,
          "fingerprint": "9c1e...",
          "shards": {
            "train/shard-00000.npz": {"size": 3170066, "digest": "5f0b...", "records": 12500},
            ...
          }
        }
      }
    }

Shard ids are paths under the data root, as the worker names them. Every shard
of a dataset has the dataset's schema (a worker refuses a dataset whose shards
differ), so the schema is written once per dataset. A worker started with
`--manifest FILE` checks every dataset it serves against the file once it has
indexed them and refuses to start on any difference, naming the shard and what
differs: a missing or extra shard, its size, record count or content digest.

A dataset with transforms (`--config`; index it with the same file) also has
"transforms": its chain as the configuration gives it, each step a table of
"fn" and its parameters; "schema" is then the chain's output. A worker whose
chain differs in any step or parameter refuses to start, naming the first step
that differs: the manifest pins what the records are, not only the shards, so a
changed pipeline is never served under a stale manifest. Index the dataset
again with the new configuration to serve it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardstream.server._fingerprint import ALGORITHM
from shardstream.server._pipelines import pipeline_text
from shardstream.server.errors import CatalogError

if TYPE_CHECKING:
    from shardstream.server._catalog import Catalog, Dataset

__all__ = [
    "VERSION",
    "Manifest",
    "check_dataset",
    "load_manifest",
    "manifest_of",
    "manifest_text",
]

VERSION = 1
_SHOWN = 5  # differences named in a refusal; the rest are counted


@dataclass(frozen=True, slots=True)
class ManifestShard:
    size: int
    digest: str
    records: int


@dataclass(frozen=True, slots=True)
class ManifestDataset:
    format: str
    schema: tuple[str, ...]
    shards: dict[str, ManifestShard]
    transforms: list[Any] = field(default_factory=list)  # [{"fn": ..., **params}]; []: none


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    datasets: dict[str, ManifestDataset]


def manifest_of(catalog: Catalog) -> dict[str, Any]:
    """The manifest of an indexed catalog, as JSON-ready data."""
    return {
        "shardstream_manifest": VERSION,
        "digest": ALGORITHM,
        "datasets": {ds.name: _dataset_entry(ds) for ds in catalog.datasets.values()},
    }


def _dataset_entry(ds: Dataset) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "format": ds.format,
        "schema": [str(f) for f in ds.schema],
        "records": ds.total_records,
        "fingerprint": ds.fingerprint,
    }
    if ds.pipeline is not None:  # as JSON holds it: what `check_dataset` compares
        entry["transforms"] = json.loads(pipeline_text(ds.pipeline.transforms))
    entry["shards"] = {
        s.id: {"size": s.size, "digest": s.digest, "records": s.records} for s in ds.shards
    }
    return entry


def manifest_text(data: dict[str, Any]) -> str:
    """A manifest as JSON text, indented, with one line per shard and per transform
    (`git diff` friendly)."""
    datasets = data["datasets"]
    head = {k: v for k, v in data.items() if k != "datasets"}
    parts = [json.dumps(head, indent=1)[:-2] + ',\n "datasets": {']
    for i, (name, ds) in enumerate(datasets.items()):
        fields = {k: v for k, v in ds.items() if k not in ("shards", "transforms")}
        body = json.dumps(fields, indent=1).replace("\n", "\n  ")[:-4]
        if "transforms" in ds:
            steps = ",\n".join(f"    {json.dumps(t)}" for t in ds["transforms"])
            body += f',\n   "transforms": [\n{steps}\n   ]'
        shards = ",\n".join(
            f"    {json.dumps(sid)}: {json.dumps(entry)}" for sid, entry in ds["shards"].items()
        )
        tail = "" if i == len(datasets) - 1 else ","
        parts.append(f'  {json.dumps(name)}: {body},\n   "shards": {{\n{shards}\n   }}\n  }}{tail}')
    parts.append(" }\n}\n")
    return "\n".join(parts)


def load_manifest(path: Path) -> Manifest:
    """Read a manifest; CatalogError naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"manifest {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(f"manifest {path} is not JSON: {exc}") from None
    try:
        return _parse(path, data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogError(
            f"manifest {path} is not a shardstream manifest (write one with "
            f"`shardstream index`): {type(exc).__name__}: {exc}"
        ) from None


def _parse(path: Path, data: Any) -> Manifest:
    if data.get("shardstream_manifest") != VERSION:
        raise ValueError(f"'shardstream_manifest' must be {VERSION}")
    if data["digest"] != ALGORITHM:
        raise ValueError(f"its digests are {data['digest']}, this worker computes {ALGORITHM}")
    datasets = {}
    for name, ds in data["datasets"].items():
        shards = {
            str(sid): ManifestShard(
                size=_count(s["size"]), digest=str(s["digest"]), records=_count(s["records"])
            )
            for sid, s in ds["shards"].items()
        }
        transforms = ds.get("transforms", [])
        if not isinstance(transforms, list) or not all(
            isinstance(t, dict) and isinstance(t.get("fn"), str) for t in transforms
        ):
            raise ValueError(f"dataset {name!r}: 'transforms' must be a list of {{\"fn\": ...}}")
        datasets[str(name)] = ManifestDataset(
            format=str(ds["format"]),
            schema=tuple(map(str, ds["schema"])),
            shards=shards,
            transforms=transforms,
        )
    return Manifest(path=path, datasets=datasets)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value


def check_dataset(ds: Dataset, manifest: Manifest) -> None:
    """CatalogError unless the indexed dataset is the one the manifest describes."""
    want = manifest.datasets.get(ds.name)
    if want is None:
        known = ", ".join(sorted(manifest.datasets)) or "none"
        raise CatalogError(
            f"dataset {ds.name!r} is not in the manifest {manifest.path} (it has: {known})"
        )
    diffs = []
    if ds.format != want.format:
        diffs.append(f"format {ds.format} here, {want.format} in the manifest")
    here = [] if ds.pipeline is None else json.loads(pipeline_text(ds.pipeline.transforms))
    if _canonical(here) != _canonical(want.transforms):
        diffs.append(_transforms_difference(here, want.transforms))
    schema = tuple(map(str, ds.schema))
    if schema != want.schema:
        here, there = ", ".join(schema), ", ".join(want.schema)
        diffs.append(f"schema [{here}] here, [{there}] in the manifest")
    for sid in sorted(want.shards.keys() - ds.by_id.keys()):
        diffs.append(f"shard {sid!r} is missing (it is in the manifest)")
    for s in ds.shards:
        m = want.shards.get(s.id)
        if m is None:
            diffs.append(f"shard {s.id!r} is not in the manifest")
        elif s.size != m.size:
            diffs.append(f"shard {s.id!r}: {s.size} bytes here, {m.size} in the manifest")
        elif s.digest != m.digest:
            diffs.append(
                f"shard {s.id!r}: content differs (same size, {s.size} bytes; digest "
                f"{s.digest} here, {m.digest} in the manifest)"
            )
        elif s.records != m.records:
            diffs.append(f"shard {s.id!r}: {s.records} records here, {m.records} in the manifest")
    if diffs:
        more = f"; and {len(diffs) - _SHOWN} more" if len(diffs) > _SHOWN else ""
        raise CatalogError(
            f"dataset {ds.name!r} differs from the manifest {manifest.path}: "
            f"{'; '.join(diffs[:_SHOWN])}{more}"
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _transforms_difference(here: list[Any], there: list[Any]) -> str:
    """The first step in which two chains of transforms differ, and how to fix it."""
    pairs = zip(map(_canonical, here), map(_canonical, there), strict=False)
    i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(here), len(there)))

    def step(chain: list[Any]) -> str:
        return _canonical(chain[i]) if i < len(chain) else "none"

    return (
        f"transforms[{i}] is {step(here)} here, {step(there)} in the manifest ({len(here)} "
        f"transforms here, {len(there)} there); a manifest pins the transforms: index the "
        "dataset again with this configuration (`shardstream index --config FILE`) to "
        "serve them"
    )
