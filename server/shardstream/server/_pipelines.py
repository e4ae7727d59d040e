"""A dataset's pipeline: its decoder's records through a chain of transforms.

A transform is a Python callable named by import path ("module:function") with
its parameters (`_config.TransformSpec`), called once per record::

    def fn(record: dict[str, Any], rng: numpy.random.Generator, **params) -> dict[str, Any]

A record is a dict of one value per field: a numpy array (or scalar) for a fixed
field, `bytes` for a "bytes" field, `str` for a "string" field, an array of any
length for a ragged one. A transform may add, drop, reshape or retype fields; the
dataset's records are what the last one returns. Its output must have the same
fields, dtypes and shapes for every record (ragged fields passed through aside):
the schema is found at start-up by running the chain on the first record of the
first non-empty shard (`probe_schema`); where the dataset declares its schema
(`DatasetSpec.schema`), that must agree with it (`_catalog`) and is the schema
served (so a declared ragged field may vary in length from record to record). A
record off the schema is a `DecodeError` naming the transform that made the field.

Randomness is a pure function of the data's position: each record's generator is
`Generator(Philox(SeedSequence([seed, epoch, shard_hash(shard id), index])))`,
from the loader's seed and epoch (sent with every read) and the record's index in
its shard; never the worker, process, chunk or resume point. So a record gets the
same augmentation whichever worker serves it, after a resume, with any number of
workers. The transforms of a chain draw from the same generator, in order.

An exception in a transform is a `DecodeError` naming the transform and the record
(DATA_LOSS for the client, which applies its `on_error`). Runs in the decoding
processes (or threads), like `_decoding`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstream.server._config import TransformSpec
from shardstream.server.errors import DecodeError
from shardstream.v1.codec import RAGGED, TEXT_DTYPES, FieldSpec, dtype_code
from shardstream.v1.ragged import Ragged

__all__ = [
    "Pipeline",
    "check_transform",
    "load_transform",
    "pipeline_text",
    "probe_schema",
    "record_rng",
    "run_pipeline",
    "shard_hash",
]

Transform = Callable[..., dict[str, Any]]
_loaded: dict[str, Transform] = {}  # this process's transforms, by reference


@dataclass(frozen=True, slots=True)
class Pipeline:
    """What a decoding job needs to run a dataset's transforms on a range of records."""

    transforms: tuple[TransformSpec, ...]
    input_schema: tuple[FieldSpec, ...]  # what the decoder gives (checked before the chain)
    seed: int = 0  # the request's: with `epoch`, what each record's generator is seeded from
    epoch: int = 0
    declared: bool = False  # whether the output schema is declared (else found at start-up)


def load_transform(ref: str) -> Transform:
    """The callable a "module:function" reference names (imported once per process)."""
    found = _loaded.get(ref)
    if found is None:
        module, _, qualname = ref.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{ref} is a {type(obj).__name__}, not a callable")
        found = _loaded[ref] = obj
    return found


def check_transform(spec: TransformSpec) -> None:
    """ValueError (one line) unless the transform imports and accepts its parameters."""
    try:
        fn = load_transform(spec.fn)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"cannot load transform {spec.fn!r}: {exc}") from None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: checked when called
        return
    try:
        signature.bind(None, None, **spec.params)
    except TypeError as exc:
        raise ValueError(
            f"transform {spec.fn!r} does not take these parameters ({exc}); it is called as "
            "fn(record, rng, **params)"
        ) from None


def pipeline_text(transforms: Sequence[TransformSpec]) -> str:
    """The chain as canonical JSON: part of the dataset's fingerprint."""
    return json.dumps([t.describe() for t in transforms], sort_keys=True, default=repr)


def code_text(transforms: Sequence[TransformSpec]) -> str:
    """A digest of each transform's module source: part of the dataset's fingerprint, so
    that workers running other versions of a transform under one name are told apart.
    The whole module, not the function alone: its helpers and constants (a `SIGMA` the
    function reads) change what it does too. A transform whose source cannot be read
    counts by its name only; libraries' versions (numpy, Pillow) are not in it."""
    digests = []
    for t in transforms:
        try:
            fn = load_transform(t.fn)
            module = inspect.getmodule(fn)
            source = inspect.getsource(module if module is not None else fn)
        except (ImportError, AttributeError, TypeError, OSError):
            source = ""
        digests.append(hashlib.blake2b(source.encode(), digest_size=8).hexdigest())
    return ",".join(digests)


def shard_hash(shard_id: str) -> int:
    """A stable 64-bit hash of a shard's id (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(shard_id.encode(), digest_size=8).digest(), "little")


def record_rng(seed: int, epoch: int, shard: int, index: int) -> np.random.Generator:
    """The generator of record `index` of the shard whose `shard_hash` is `shard`."""
    sequence = np.random.SeedSequence([seed, epoch, shard, index])
    return np.random.Generator(np.random.Philox(sequence))


def _item(column: Any, i: int, spec: FieldSpec) -> Any:
    """Record `i` of a decoded column, as a transform sees it."""
    if isinstance(column, Ragged):
        values = column.values[column.offsets[i] : column.offsets[i + 1]]
        if spec.dtype == "bytes":
            return values.tobytes()
        if spec.dtype == "string":
            return values.tobytes().decode("utf-8")
        return values
    return column[i]


def _records(
    raw: Mapping[str, Any], schema: tuple[FieldSpec, ...], count: int
) -> list[dict[str, Any]]:
    specs = {f.name: f for f in schema}
    return [{k: _item(v, i, specs[k]) for k, v in raw.items()} for i in range(count)]


def _spec_of(name: str, value: Any, inputs: Mapping[str, FieldSpec]) -> FieldSpec | None:
    """The field a record's value makes (None: not a servable value). A value of a
    ragged input field, of its dtype and item shape, stays ragged."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return FieldSpec(name=name, dtype="bytes", shape=())
    if isinstance(value, str):
        return FieldSpec(name=name, dtype="string", shape=())
    if not isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        return None
    a = np.asarray(value)
    try:
        dtype_code(a.dtype.name)
    except ValueError:
        return None
    given = inputs.get(name)
    if (
        given is not None
        and given.shape[:1] == (RAGGED,)
        and a.ndim == len(given.shape)
        and a.dtype.name == given.dtype
        and a.shape[1:] == given.inner
    ):
        return given
    return FieldSpec(name=name, dtype=a.dtype.name, shape=a.shape)


def _fits(value: Any, spec: FieldSpec) -> bool:
    if spec.dtype in TEXT_DTYPES:
        text = spec.dtype == "string"
        return isinstance(value, str) if text else isinstance(value, (bytes, bytearray, memoryview))
    if not isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        return False
    a = np.asarray(value)
    if a.dtype.name != spec.dtype:
        return False
    if spec.shape[:1] == (RAGGED,):
        return a.ndim == len(spec.shape) and a.shape[1:] == spec.inner
    return a.shape == spec.shape


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        a = np.asarray(value)
        return f"{a.dtype.name}{list(a.shape)}"
    return type(value).__name__


class _Chain:
    """The transforms of one pipeline, loaded; runs one record at a time."""

    def __init__(self, transforms: tuple[TransformSpec, ...]) -> None:
        self.specs = transforms
        try:
            self.fns = [load_transform(t.fn) for t in transforms]
        except (ImportError, AttributeError, TypeError) as exc:
            raise DecodeError(f"cannot load a transform: {exc}") from None

    def run(
        self, record: dict[str, Any], rng: np.random.Generator, index: int
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The record through the chain; and per field, the transform that made it."""
        made: dict[str, str] = {}
        for spec, fn in zip(self.specs, self.fns, strict=True):
            before = record
            try:
                out = fn(dict(record), rng, **spec.params)
            except DecodeError as exc:
                raise DecodeError(f"transform {spec.fn}: {exc}", record=index) from None
            except MemoryError:
                raise  # as for decoders: the read is tried again (elsewhere), not lost
            except BaseException as exc:
                # A bug or bad data: DATA_LOSS naming the transform. Also SystemExit,
                # KeyboardInterrupt, GeneratorExit: a transform cannot mean them (SIGINT
                # never reaches decoding), and let through they ended the worker, one
                # after another as the read moved on through the fleet.
                raise DecodeError(
                    f"transform {spec.fn} raised {type(exc).__name__}: {exc}", record=index
                ) from None
            if not isinstance(out, dict):
                raise DecodeError(
                    f"transform {spec.fn} returned a {type(out).__name__}, not a dict of fields",
                    record=index,
                )
            for name, value in out.items():
                if before.get(name, _MISSING) is not value:
                    made[name] = spec.fn
            record = out
        return record, made


_MISSING = object()


def probe_schema(
    decoder: Any,
    path: Any,
    input_schema: tuple[FieldSpec, ...],
    transforms: tuple[TransformSpec, ...],
    shard_id: str,
    index: int = 0,
) -> tuple[FieldSpec, ...]:
    """The pipeline's output schema: the chain run on record `index` of a shard, with the
    generator of (seed 0, epoch 0, that record). Raises DecodeError naming the transform."""
    from shardstream.server._decoders import check_arrays

    runs = []
    h = shard_hash(shard_id)
    for _ in range(2):  # twice, from a fresh decode: a transform may change its input
        raw = decoder.read(path, index, 1)
        check_arrays(raw, input_schema, index, 1)
        (record,) = _records(raw, input_schema, 1)
        runs.append(_Chain(transforms).run(record, record_rng(0, 0, h, index), index))
    (out, made), (again, _) = runs
    if not out:
        raise DecodeError(f"transform {transforms[-1].fn} returned a record without fields")
    for name in sorted(out):
        if not _same(out[name], again.get(name, _MISSING)):
            raise DecodeError(
                f"transform {made.get(name, transforms[-1].fn)} gave field {name!r} of record "
                f"{index} differently on two runs with the same generator: a transform must draw "
                "its randomness from its `rng` argument only (not numpy's or Python's global "
                "generators, the time or the process), or the same seed and epoch would give "
                "other records on another worker or after a resume",
                record=index,
            )
    inputs = {f.name: f for f in input_schema}
    schema = []
    for name in sorted(out):
        spec = _spec_of(name, out[name], inputs)
        if spec is None:
            raise DecodeError(
                f"transform {made.get(name, transforms[-1].fn)} gave field {name!r} as "
                f"{_describe(out[name])}, which no tensor holds; give a numpy array of a "
                "numeric or bool dtype, bytes or str",
                record=index,
            )
        schema.append(spec)
    return tuple(schema)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        )
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN
    return type(a) is type(b) and bool(a == b)


def run_pipeline(
    pipeline: Pipeline,
    raw: Mapping[str, Any],
    schema: tuple[FieldSpec, ...],
    start: int,
    count: int,
    shard_id: str,
    out: Mapping[str, np.ndarray[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Records [start, start + count) of decoded columns `raw` through the chain: one
    column per field of `schema` (the output schema), written into `out`'s arrays
    where given (fixed fields)."""
    chain = _Chain(pipeline.transforms)
    h = shard_hash(shard_id)
    columns: dict[str, Any] = dict(out or {})
    for spec in schema:
        if not spec.ragged and spec.name not in columns:
            columns[spec.name] = np.empty((count, *spec.shape), spec.dtype)
    items: dict[str, list[Any]] = {f.name: [] for f in schema if f.ragged}
    names = sorted(f.name for f in schema)
    last = pipeline.transforms[-1].fn
    origin = "declared" if pipeline.declared else "found at start-up"
    for i, record in enumerate(_records(raw, pipeline.input_schema, count)):
        index = start + i
        rng = record_rng(pipeline.seed, pipeline.epoch, h, index)
        result, made = chain.run(record, rng, index)
        if sorted(result) != names:
            raise DecodeError(
                f"transform {last} gave fields {sorted(result)} at record {index}, where the "
                f"dataset's schema ({origin}) has {names}; a pipeline must give the same "
                "fields for every record",
                record=index,
            )
        for spec in schema:
            value = result[spec.name]
            if not _fits(value, spec):
                raise DecodeError(
                    f"transform {made.get(spec.name, last)} gave field {spec.name!r} as "
                    f"{_describe(value)} at record {index}, where the dataset's schema "
                    f"({origin}) says {spec}; a transform must give the same fields, dtypes "
                    "and shapes for every record",
                    record=index,
                )
            if spec.dtype == "string":
                try:
                    value = value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise DecodeError(
                        f"transform {made.get(spec.name, last)} gave field {spec.name!r} a "
                        f"string that has no UTF-8 ({exc.reason} at character {exc.start}) "
                        f"at record {index}",
                        record=index,
                    ) from None
            elif spec.dtype == "bytes":
                value = bytes(value)
            if spec.ragged:
                items[spec.name].append(value)
            else:
                columns[spec.name][i] = value
    for spec in schema:
        if spec.ragged:
            values = items[spec.name]
            if spec.dtype in TEXT_DTYPES:
                columns[spec.name] = Ragged.from_bytes(values)
            else:
                columns[spec.name] = Ragged.from_items(values, spec.dtype, spec.inner)
    return columns
