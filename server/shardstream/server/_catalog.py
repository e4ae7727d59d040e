"""The catalog: the datasets a worker serves, indexed once at start-up.

Shard ids are paths relative to the data root with '/' separators. Nothing
outside the data root is ever indexed or read: globs are relative, and files
(or symlinks) resolving outside the root are refused. The data root is a local
directory or an fsspec URL (see `_files`); a shard's path is a `Path` or its URL.

A dataset with transforms (`DatasetSpec.transforms`) is read with its format's
`encoded_format` decoder where it has one (wds: images as their encoded bytes);
its schema is the chain's output, found by running the chain on the first record
of the first non-empty shard that decodes (`_pipelines.probe_schema`, in a decoding
process; a record that does not decode is passed over for the next, up to
`PROBE_RECORDS` records of up to `PROBE_SHARDS` shards: reads then say why it does
not, or skip it), and its fingerprint covers the chain, so workers running other
transforms under the same name are refused by clients. The time a sample of its
records takes through the decoder and the chain (`measure_records`) bounds the
records in a chunk (`Dataset.seconds_per_record`), so that a slow chain over small
records still sends a chunk long before a client gives up waiting for one.

A dataset may declare its schema (`DatasetSpec.schema`): the fields its decoder,
or its transforms on that first record, must give. Start-up refuses any
difference, naming each field, and the declared fields are the schema served and
the one every record read is checked against; a declared ragged field (shape
[-1, ...]) takes a transform's array of any length.

Indexing a shard asks its decoder for the record count and schema (in a decoding
process) and, at the same time, reads every byte for its content digest (threads
of `_fingerprint.Digester`, or its cache); both must have seen the same file. A
dataset whose spec names a manifest is then checked against it (`_manifest`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from shardstream.server._config import DatasetSpec, TransformSpec
from shardstream.server._decoders import ShardMeta, decoder_class, decoder_ref, format_for_path
from shardstream.server._decoding import decoder, decoder_errors
from shardstream.server._files import (
    ShardPath,
    Stamp,
    glob_url,
    is_url,
    pinned,
    redact,
    shard_stat,
    url_root,
)
from shardstream.server._fingerprint import (
    THREADS,
    Digest,
    Digester,
    Progress,
    shard_fingerprint,
)
from shardstream.server._manifest import Manifest, check_dataset, load_manifest
from shardstream.server._pipelines import Pipeline, code_text, pipeline_text, probe_schema
from shardstream.server._ragged import sample_bytes
from shardstream.server.errors import CatalogError, DecodeError, ShardChanged
from shardstream.v1.codec import RAGGED, FieldSpec, is_ragged, record_bytes

__all__ = ["Catalog", "CatalogError", "Dataset", "Shard", "build_catalog", "index_in_threads"]

log = logging.getLogger("shardstream.index")


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    path: ShardPath  # a Path under a local data root, the file's URL under a URL root
    records: int
    fingerprint: str  # of size, records, schema and digest (`_fingerprint.shard_fingerprint`)
    stamp: Stamp  # `shard_stat` when indexed (see `_files`): reads refuse a changed file
    size: int  # bytes
    digest: str  # of every byte (`_fingerprint.ALGORITHM`)


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    format: str
    decoder: str  # "module:Class", loadable in any decoding process
    shards: tuple[Shard, ...]
    schema: tuple[FieldSpec, ...]
    fingerprint: str
    by_id: dict[str, Shard] = field(repr=False, compare=False)
    # The transforms and the decoder's schema, when the dataset has transforms
    # (`schema` is then their output); None: the decoder's records as they are.
    pipeline: Pipeline | None = None
    # With ragged fields: a record's mean bytes in chunks over a sample (`measure_records`);
    # 0: fixed fields only (`record_bytes` says), or not measured.
    mean_record_bytes: int = 0
    # With transforms: seconds a record takes through the decoder and the transforms, the
    # median of a sample's shards (`measure_records`); it caps the records of a chunk
    # (`_streaming.CHUNK_SECONDS`). 0: no transforms, or not measured.
    seconds_per_record: float = 0.0

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
    stamp: Stamp  # `shard_stat` before the decoder looked at the file


IndexFn = Callable[[str, ShardPath], Awaitable[Indexed]]
# Runs `probe_pipeline` (ref, path, schema, transforms, shard id, record) in a decoding
# process; None: in a thread.
ProbeFn = Callable[
    [str, ShardPath, tuple[FieldSpec, ...], tuple[TransformSpec, ...], str, int],
    Awaitable[tuple[FieldSpec, ...]],
]
# Runs `sample_bytes` (ref, path, stamp, count, schema, shard id, pipeline) in a decoding
# process, timed there (`timed_sample`): (bytes, records, seconds) of the records
# that decode and the wall time the whole call took in that process.
MeasureFn = Callable[..., Awaitable[tuple[int, int, float]]]
# The sample that sizes reads of a dataset with ragged fields, and times those of a
# dataset with transforms: the first records of shards spread over the dataset.
SAMPLE_SHARDS = 8
SAMPLE_RECORDS = 32
# Where record 0 of the first non-empty shard does not decode through the transforms,
# the output schema is found on the next that does: up to this many records of that
# shard, then the first record of up to this many other shards.
PROBE_RECORDS = 8
PROBE_SHARDS = 4


def index_shard(ref: str, path: ShardPath) -> Indexed:
    """Index one shard (runs in a decoding process): its meta and file stamp."""
    stamp = shard_stat(path)
    with decoder_errors(ref, path), pinned(path, stamp):  # the meta is of this very file
        meta = decoder(ref).index(path)
    return Indexed(meta, stamp)


def probe_pipeline(
    ref: str,
    path: ShardPath,
    schema: tuple[FieldSpec, ...],
    transforms: tuple[TransformSpec, ...],
    shard_id: str,
    record: int = 0,
) -> tuple[FieldSpec, ...]:
    """The output schema of a chain of transforms, run on one record of a shard (runs in
    a decoding process)."""
    with decoder_errors(ref, path):
        return probe_schema(decoder(ref), path, schema, transforms, shard_id, record)


def timed_sample(*args: object) -> tuple[int, int, float]:
    """`_ragged.sample_bytes` (runs in a decoding process) and the wall time it took there:
    (bytes, records, seconds)."""
    began = time.perf_counter()
    size, records = sample_bytes(*args)  # type: ignore[arg-type]
    return size, records, time.perf_counter() - began


def resolve_files(root: Path | str, spec: DatasetSpec) -> list[tuple[str, ShardPath]]:
    """(shard id, path) of the files a dataset's glob matches, sorted by id."""
    found: list[tuple[str, ShardPath]] = []
    if isinstance(root, str):
        try:
            found.extend(glob_url(root, spec.pattern))
        except (ValueError, OSError) as exc:
            raise CatalogError(f"dataset {spec.name!r}: {redact(str(exc))}") from None
        if not found:
            raise CatalogError(
                f"dataset {spec.name!r}: no file under {redact(root)} matches {spec.pattern!r}"
            )
        return _named(spec, found)
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
    return _named(spec, found)


def _named(spec: DatasetSpec, found: list[tuple[str, ShardPath]]) -> list[tuple[str, ShardPath]]:
    """`found`, once every shard id is UTF-8 text, as clients are told it (a file name
    the filesystem holds as other bytes decodes with surrogates). Files the glob does not
    match never get here."""
    for sid, _ in found:
        try:
            sid.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(sid)
            raise CatalogError(
                f"dataset {spec.name!r}: the file {raw!r} under the data root matches "
                f"{spec.pattern!r}, but its name is not UTF-8, and shard ids are sent to "
                "clients as UTF-8 text; rename it, or give a glob that leaves it out"
            ) from None
    return found


async def build_dataset(
    root: Path | str,
    spec: DatasetSpec,
    index: IndexFn,
    max_record_bytes: int,
    digester: Digester,
    manifest: Manifest | None = None,
    probe: ProbeFn | None = None,
    measure: MeasureFn | None = None,
) -> Dataset:
    files = await asyncio.to_thread(resolve_files, root, spec)
    formats = {spec.format or format_for_path(sid) for sid, _ in files}
    if len(formats) != 1:
        raise CatalogError(
            f"dataset {spec.name!r} mixes formats {sorted(formats)}; give one as NAME=GLOB:FORMAT"
        )
    (fmt,) = formats
    try:
        encoded = decoder_class(fmt).encoded_format if spec.transforms else ""
        ref = decoder_ref(encoded or fmt)
    except ValueError as exc:
        raise CatalogError(f"dataset {spec.name!r}: {exc}") from None
    progress = Progress(spec.name, len(files))

    async def index_one(sid: str, path: ShardPath) -> tuple[Indexed, Digest]:
        try:
            ix, dg = await asyncio.gather(
                index(ref, path), digester.digest(path, progress, spec.cache_dir)
            )
        except ShardChanged as exc:
            raise CatalogError(
                f"dataset {spec.name!r}: shard {sid!r} {exc}; start again once it is written"
            ) from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise CatalogError(f"dataset {spec.name!r}: cannot read shard {sid!r}: {why}") from None
        if ix.stamp != dg.stamp:
            raise CatalogError(
                f"dataset {spec.name!r}: shard {sid!r} changed while it was being indexed; "
                "start again once it is written"
            )
        return ix, dg

    try:
        metas = await asyncio.gather(*(index_one(sid, path) for sid, path in files))
    except DecodeError as exc:
        raise CatalogError(f"dataset {spec.name!r}: cannot index a shard: {exc}") from exc
    log.info("dataset %r: indexed %s", spec.name, progress.summary())
    schema = metas[0][0].meta.schema
    shards = tuple(
        Shard(id=sid, path=path, records=ix.meta.records, stamp=ix.stamp, size=dg.size,
              digest=dg.digest,
              fingerprint=shard_fingerprint(dg.size, ix.meta.records, ix.meta.schema, dg.digest,
                                            ix.meta.params))
        for (sid, path), (ix, dg) in zip(files, metas, strict=True)
    )  # fmt: skip
    for (sid, _), (ix, _dg) in zip(files, metas, strict=True):
        meta = ix.meta
        if meta.schema != schema:
            raise CatalogError(
                f"dataset {spec.name!r}: shard {sid!r} has schema "
                f"[{', '.join(map(str, meta.schema))}], but shard {files[0][0]!r} has "
                f"[{', '.join(map(str, schema))}]{_schema_difference(schema, meta.schema)}"
            )
    skipped = sorted({line for ix, _ in metas for line in ix.meta.skipped})
    if skipped:
        log.warning(
            "dataset %r: not served (select fields explicitly to make this an error): %s",
            spec.name,
            "; ".join(skipped),
        )
    pipeline = None
    probed = ""  # the record the transforms' output schema was found on
    if spec.transforms:
        declared = spec.schema is not None
        pipeline = Pipeline(transforms=spec.transforms, input_schema=schema, declared=declared)
        schema, probed = await _probe(spec, ref, shards, schema, probe)
    if spec.schema is not None:
        schema = _declared(spec, schema, probed)
    if record_bytes(schema) > max_record_bytes:
        raise CatalogError(
            f"dataset {spec.name!r}: one record takes {record_bytes(schema)} bytes, more than "
            f"a message may carry ({max_record_bytes}); raise --max-message-bytes"
        )
    ds = Dataset(
        name=spec.name,
        format=fmt,
        decoder=ref,
        shards=shards,
        schema=schema,
        fingerprint=dataset_fingerprint(
            shards,
            schema,
            ""
            if pipeline is None
            else pipeline_text(pipeline.transforms) + "\0code\0" + code_text(pipeline.transforms),
        ),
        by_id={s.id: s for s in shards},
        pipeline=pipeline,
    )
    if measure is not None and (is_ragged(schema) or pipeline is not None):
        mean, seconds = await measure_records(ds, measure)
        ds = replace(
            ds,
            mean_record_bytes=mean if is_ragged(schema) else 0,
            seconds_per_record=seconds if pipeline is not None else 0.0,
        )
    if manifest is not None:
        check_dataset(ds, manifest)
        log.info("dataset %r matches the manifest %s", ds.name, manifest.path)
    return ds


async def _probe(
    spec: DatasetSpec,
    ref: str,
    shards: Sequence[Shard],
    schema: tuple[FieldSpec, ...],
    probe: ProbeFn | None,
) -> tuple[tuple[FieldSpec, ...], str]:
    """The output schema of the dataset's transforms, from the first record that decodes
    through them: records 0 to `PROBE_RECORDS` - 1 of the first non-empty shard, then
    record 0 of up to `PROBE_SHARDS` other shards; and which record that was (for
    messages). CatalogError naming what was tried where none does."""
    full = [s for s in shards if s.records]
    if not full:
        raise CatalogError(
            f"dataset {spec.name!r} has transforms but no records to find their output schema from"
        )
    first = full[0]
    tries = [(first, i) for i in range(min(PROBE_RECORDS, first.records))]
    tries += [(s, 0) for s in full[1 : 1 + PROBE_SHARDS]]
    failed: list[str] = []
    for shard, record in tries:
        args = (ref, shard.path, schema, spec.transforms, shard.id, record)
        try:
            if probe is None:
                found = await asyncio.to_thread(probe_pipeline, *args)
            else:
                found = await probe(*args)
        except DecodeError as exc:
            failed.append(f"record {record} of shard {shard.id!r}: {exc}")
            continue
        if failed:
            log.warning(
                "dataset %r: output schema of the transforms found on record %d of shard %r; "
                "they fail on %s",
                spec.name,
                record,
                shard.id,
                "; ".join(failed),
            )
        return found, f"record {record} of shard {shard.id!r}"
    mine = min(PROBE_RECORDS, first.records)
    records = "record 0" if mine == 1 else f"records 0-{mine - 1}"
    others = len(tries) - mine
    # Each reason once (a wrong parameter fails every record alike), with its first record.
    reasons: dict[str, str] = {}
    for text in failed:
        where, _, why = text.partition(": ")
        reasons.setdefault(why, where)
    shown = [f"{where}: {why}" for why, where in list(reasons.items())[:3]]
    if len(reasons) > 3:
        shown.append(f"... ({len(reasons) - 3} other reasons)")
    raise CatalogError(
        f"dataset {spec.name!r}: its transforms fail on every record tried to find their "
        f"output schema ({records} of shard {first.id!r}"
        + (f" and record 0 of the next {others} shard(s)" if others else "")
        + f"): {'; '.join(shown)}"
    )


async def measure_records(ds: Dataset, measure: MeasureFn) -> tuple[int, float]:
    """A record's mean bytes in chunks (data and lengths), over the first
    `SAMPLE_RECORDS` records of up to `SAMPLE_SHARDS` shards spread over the dataset,
    decoded as reads decode them (through the transforms, seed 0), and the seconds a
    record took: per shard, the call's wall time in its decoding process (not around
    the await here, which also counts the wait for a free process) over its records;
    the median of those shards (a cold process's first imports of the transforms' modules
    or one cheap shard weigh little). Records that do not decode are left out of the
    bytes (their reads say why, or skip them), not out of the time; 0: nothing decoded."""
    full = [s for s in ds.shards if s.records]
    picks = {i * len(full) // SAMPLE_SHARDS for i in range(SAMPLE_SHARDS)} if full else set()

    async def one(s: Shard) -> tuple[int, int, float]:
        count = min(SAMPLE_RECORDS, s.records)
        try:
            return await measure(ds.decoder, s.path, s.stamp, count, ds.schema, s.id, ds.pipeline)
        except (OSError, ShardChanged) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CatalogError(
                f"dataset {ds.name!r}: cannot read records 0-{count - 1} of shard {s.id!r}, "
                f"which size its reads: {why}"
            ) from None

    sizes = await asyncio.gather(*(one(full[i]) for i in sorted(picks)))
    records = sum(n for _, n, _ in sizes)
    mean = -(-sum(b for b, _, _ in sizes) // records) if records else 0
    per = sorted(t / n for _, n, t in sizes if n)
    return mean, per[(len(per) - 1) // 2] if per else 0.0


def _declared(
    spec: DatasetSpec, found: tuple[FieldSpec, ...], probed: str = ""
) -> tuple[FieldSpec, ...]:
    """The schema served where the dataset declares one: each field of `found` (what its
    decoder or transforms, on the record `probed`, give) as declared. CatalogError naming
    every field that differs."""
    declared = {f.name: f for f in spec.schema or ()}
    given = {f.name: f for f in found}
    notes = []
    for name in sorted(declared.keys() | given.keys()):
        d, g = declared.get(name), given.get(name)
        if g is None:
            notes.append(f"field {name!r} declared {_kind(d)}, not found")
        elif d is None:
            notes.append(f"field {name!r} found {_kind(g)}, not declared")
        elif d != g and not (spec.transforms and _takes(d, g)):
            notes.append(f"field {name!r} declared {_kind(d)}, found {_kind(g)}")
    if notes:
        if spec.transforms:
            where, fix = f"its transforms give on {probed}", "transforms"
        else:
            where, fix = "its shards have", "shards"
        raise CatalogError(
            f"dataset {spec.name!r}: its declared schema is not what {where}: "
            f"{'; '.join(notes)}; fix the declaration ([datasets.{spec.name}.schema] in the "
            f"--config file) or the {fix}"
        )
    return tuple(declared[f.name] for f in found)


def _kind(spec: FieldSpec | None) -> str:
    """A field's dtype and shape, as `FieldSpec.__str__` writes them ("float32[3x8x8]")."""
    return "" if spec is None else str(spec).removeprefix(f"{spec.name}:")


def _takes(declared: FieldSpec, found: FieldSpec) -> bool:
    """Whether a declared ragged field takes what a transform gave on one record."""
    return (
        declared.shape[:1] == (RAGGED,)
        and not found.ragged
        and found.dtype == declared.dtype
        and found.shape[:1] != ()
        and found.shape[1:] == declared.inner
    )


def _schema_difference(first: Sequence[FieldSpec], other: Sequence[FieldSpec]) -> str:
    """Which fields differ between two schemas, saying when one is ragged and one fixed."""
    a, b = {f.name: f for f in first}, {f.name: f for f in other}
    notes = []
    for name in sorted(a.keys() | b.keys()):
        fa, fb = a.get(name), b.get(name)
        if fa is None or fb is None:
            notes.append(f"field {name!r} is only in {'the first' if fb is None else 'this'} shard")
        elif fa != fb:
            kind = ""
            if fa.ragged != fb.ragged:
                kind = (
                    f" (ragged in {'the first' if fa.ragged else 'this'} shard, fixed in the other)"
                )
            notes.append(f"field {name!r}: {fb} here, {fa} there{kind}")
    hint = (
        "; declare the fields in a _schema.json beside the shards (or fix the shards) so "
        "that every shard has the same"
    )
    return (": " + "; ".join(notes) + hint) if notes else ""


def dataset_fingerprint(
    shards: Sequence[Shard], schema: Sequence[FieldSpec], pipeline: str = ""
) -> str:
    """Of the shards, the schema served and the transforms (`pipeline_text`), if any."""
    h = hashlib.blake2b(digest_size=12)
    for s in shards:
        h.update(f"{s.id}\0{s.records}\0{s.fingerprint}\n".encode())
    h.update(";".join(map(str, schema)).encode())
    if pipeline:
        h.update(b"\0transforms\0" + pipeline.encode())
    return h.hexdigest()


async def build_catalog(
    root: Path | str,
    specs: Sequence[DatasetSpec],
    index: IndexFn,
    max_record_bytes: int,
    probe: ProbeFn | None = None,
    measure: MeasureFn | None = None,
) -> Catalog:
    """Index every dataset: shards, counts, schema, content digests (cached where a spec
    names a cache directory), checked against a manifest where a spec names one."""
    root = await asyncio.to_thread(_absolute_root, root)
    manifests: dict[Path, Manifest] = {}
    for spec in specs:
        if spec.manifest is not None and spec.manifest not in manifests:
            manifests[spec.manifest] = await asyncio.to_thread(load_manifest, spec.manifest)
    datasets = {}
    async with Digester() as digester:
        for spec in specs:
            manifest = None if spec.manifest is None else manifests[spec.manifest]
            datasets[spec.name] = await build_dataset(
                root, spec, index, max_record_bytes, digester, manifest, probe, measure
            )
    return Catalog(root=root, datasets=datasets)


async def index_in_threads(root: Path | str, specs: Sequence[DatasetSpec]) -> Catalog:
    """Index datasets in threads of this process, as `shardstream index` does (records
    of any size are accepted: the manifest describes the data, not one worker)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="shardstream-index")
    try:

        async def index(ref: str, path: ShardPath) -> Indexed:
            return await loop.run_in_executor(pool, index_shard, ref, path)

        return await build_catalog(root, specs, index, sys.maxsize)
    finally:
        await loop.run_in_executor(None, lambda: pool.shutdown(wait=True, cancel_futures=True))


def _absolute_root(root: Path | str) -> Path | str:
    if is_url(root):
        try:
            return url_root(str(root))
        except (ImportError, ValueError, OSError) as exc:  # no password in a log line
            raise CatalogError(f"data root {redact(str(root))}: {redact(str(exc))}") from None
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"data root {root} is not a directory")
    return root.absolute()
