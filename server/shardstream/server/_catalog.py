"""The catalog: the datasets a worker serves, indexed once at start-up.

Shard ids are paths relative to the data root with '/' separators. Nothing
outside the data root is ever indexed or read: globs are relative, and files
(or symlinks) resolving outside the root are refused. The data root is a local
directory or an fsspec URL (see `_files`); a shard's path is a `Path` or its URL.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardstream.server._config import DatasetSpec
from shardstream.server._decoders import ShardMeta, decoder_ref, format_for_path
from shardstream.server._decoding import decoder
from shardstream.server._files import (
    ShardPath,
    Stamp,
    glob_url,
    is_url,
    open_shard,
    shard_stat,
    url_root,
)
from shardstream.server.errors import CatalogError, DecodeError
from shardstream.v1.codec import FieldSpec, record_bytes

__all__ = ["Catalog", "CatalogError", "Dataset", "Shard", "build_catalog", "fingerprint_file"]

_SAMPLE = 64 * 1024  # bytes hashed at each end of a shard for its fingerprint


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    path: ShardPath  # a Path under a local data root, the file's URL under a URL root
    records: int
    fingerprint: str
    stamp: Stamp  # (size, mtime_ns) when indexed (see `_files`): reads refuse a changed file


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    format: str
    decoder: str  # "module:Class", loadable in any decoding process
    shards: tuple[Shard, ...]
    schema: tuple[FieldSpec, ...]
    fingerprint: str
    by_id: dict[str, Shard] = field(repr=False, compare=False)

    @property
    def total_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def record_bytes(self) -> int:
        return record_bytes(self.schema)


@dataclass(frozen=True, slots=True)
class Catalog:
    root: Path | str  # an absolute directory, or a canonical fsspec URL
    datasets: dict[str, Dataset]


@dataclass(frozen=True, slots=True)
class Indexed:
    meta: ShardMeta
    fingerprint: str
    stamp: Stamp


IndexFn = Callable[[str, ShardPath], Awaitable[Indexed]]


def index_shard(ref: str, path: ShardPath) -> Indexed:
    """Index one shard (runs in a decoding process): meta, fingerprint, file stamp."""
    stamp = shard_stat(path)
    meta = decoder(ref).index(path)
    return Indexed(meta, fingerprint_file(path, meta), stamp)


def fingerprint_file(path: ShardPath, meta: ShardMeta) -> str:
    """A content fingerprint: size, record count, schema and the first and last 64 KiB."""
    h = hashlib.blake2b(digest_size=12)
    size = shard_stat(path)[0]
    h.update(f"{size}:{meta.records}:{';'.join(map(str, meta.schema))}".encode())
    with open_shard(path) as f:
        h.update(f.read(_SAMPLE))
        if size > _SAMPLE:
            f.seek(max(_SAMPLE, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def resolve_files(root: Path | str, spec: DatasetSpec) -> list[tuple[str, ShardPath]]:
    """(shard id, path) of the files a dataset's glob matches, sorted by id."""
    found: list[tuple[str, ShardPath]] = []
    if isinstance(root, str):
        try:
            found.extend(glob_url(root, spec.pattern))
        except (ValueError, OSError) as exc:
            raise CatalogError(f"dataset {spec.name!r}: {exc}") from None
        if not found:
            raise CatalogError(
                f"dataset {spec.name!r}: no file under {root} matches {spec.pattern!r}"
            )
        return found
    real_root = root.resolve()
    for path in root.glob(spec.pattern):
        if not path.is_file():
            continue
        real = path.resolve()
        if not real.is_relative_to(real_root):
            raise CatalogError(
                f"dataset {spec.name!r}: {path} resolves to {real}, outside the data root "
                f"{real_root}; refusing to serve it"
            )
        found.append((path.relative_to(root).as_posix(), real))
    found.sort()
    if not found:
        raise CatalogError(f"dataset {spec.name!r}: no file under {root} matches {spec.pattern!r}")
    return found


async def build_dataset(
    root: Path | str, spec: DatasetSpec, index: IndexFn, max_record_bytes: int
) -> Dataset:
    files = await asyncio.to_thread(resolve_files, root, spec)
    formats = {spec.format or format_for_path(sid) for sid, _ in files}
    if len(formats) != 1:
        raise CatalogError(
            f"dataset {spec.name!r} mixes formats {sorted(formats)}; give one as NAME=GLOB:FORMAT"
        )
    (fmt,) = formats
    try:
        ref = decoder_ref(fmt)
    except ValueError as exc:
        raise CatalogError(f"dataset {spec.name!r}: {exc}") from None
    try:
        metas = await asyncio.gather(*(index(ref, path) for _, path in files))
    except DecodeError as exc:
        raise CatalogError(f"dataset {spec.name!r}: cannot index a shard: {exc}") from exc
    shards = tuple(
        Shard(id=sid, path=path, records=ix.meta.records, fingerprint=ix.fingerprint,
              stamp=ix.stamp)
        for (sid, path), ix in zip(files, metas, strict=True)
    )  # fmt: skip
    schema = metas[0].meta.schema
    for (sid, _), ix in zip(files, metas, strict=True):
        meta = ix.meta
        if meta.schema != schema:
            raise CatalogError(
                f"dataset {spec.name!r}: shard {sid!r} has schema "
                f"[{', '.join(map(str, meta.schema))}], but shard {files[0][0]!r} has "
                f"[{', '.join(map(str, schema))}]"
            )
    if record_bytes(schema) > max_record_bytes:
        raise CatalogError(
            f"dataset {spec.name!r}: one record takes {record_bytes(schema)} bytes, more than "
            f"a message may carry ({max_record_bytes}); raise --max-message-bytes"
        )
    return Dataset(
        name=spec.name,
        format=fmt,
        decoder=ref,
        shards=shards,
        schema=schema,
        fingerprint=dataset_fingerprint(shards, schema),
        by_id={s.id: s for s in shards},
    )


def dataset_fingerprint(shards: Sequence[Shard], schema: Sequence[FieldSpec]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for s in shards:
        h.update(f"{s.id}\0{s.records}\0{s.fingerprint}\n".encode())
    h.update(";".join(map(str, schema)).encode())
    return h.hexdigest()


async def build_catalog(
    root: Path | str, specs: Sequence[DatasetSpec], index: IndexFn, max_record_bytes: int
) -> Catalog:
    root = await asyncio.to_thread(_absolute_root, root)
    datasets = {}
    for spec in specs:
        datasets[spec.name] = await build_dataset(root, spec, index, max_record_bytes)
    return Catalog(root=root, datasets=datasets)


def _absolute_root(root: Path | str) -> Path | str:
    if is_url(root):
        try:
            return url_root(str(root))
        except (ImportError, ValueError, OSError) as exc:
            raise CatalogError(f"data root {root}: {exc}") from None
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"data root {root} is not a directory")
    return root.absolute()
