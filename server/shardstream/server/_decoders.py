"""The decoder interface: how a worker turns one shard file into records.

A format is one class::

    class MyFormat(Decoder):
        name = "myformat"
        suffixes = (".my",)

        def index(self, path: ShardPath) -> ShardMeta:
            ...  # count records, report the schema; called once per shard at start-up

        def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray]:
            ...  # records [start, start + count): one array per field, first dim = count

A ragged field (`FieldSpec.ragged`: a first dimension of -1, or a "string" /
"bytes" field) is read as a `Ragged` (`shardstream.v1.ragged`) of `count`
records: e.g. `Ragged.from_items(token_lists, "int32")`, or
`Ragged.from_bytes(texts)` for text (the UTF-8 of a "string" field is checked
for the decoder, naming the first bad record).

A format that can decode straight into preallocated arrays (the message being
built) may also override `read_into`; the default calls `read` and copies.

`path` is a `pathlib.Path` under a local data root (as always) and the shard's
URL (`str`) under an fsspec data root; `open_shard(path)` and `shard_stat(path)`
from `shardstream.server._files` work with both.

Decoders run in worker processes (never on the event loop). An instance may
cache per-shard state (open files, offsets) between `read` calls; it is
created with no arguments in every decoding process. Errors in the data are
raised as `DecodeError` (from `shardstream.server.errors`, also importable from
here and `shardstream.server`), naming the record where known. A `MemoryError`
in a subclass's `index`, `read` or `read_into` becomes such a `DecodeError` on
its own (`memory_is_data_loss`): a shard that declares more than a worker can
hold is refused at start-up or is DATA_LOSS for the client, never UNKNOWN.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shardstream.server._files import ShardPath
from shardstream.server.errors import DecodeError
from shardstream.v1.codec import FieldSpec, storage_dtype
from shardstream.v1.ragged import Ragged

__all__ = [
    "DecodeError",
    "Decoder",
    "ShardMeta",
    "ShardPath",
    "decoder_class",
    "decoder_ref",
    "load_decoder",
    "memory_is_data_loss",
    "register_decoder",
]

_GUARDED = "_shardstream_memory_guard"  # set on methods that `_guard` already wraps


@dataclass(frozen=True, slots=True)
class ShardMeta:
    """What indexing one shard found: its record count and schema."""

    records: int
    schema: tuple[FieldSpec, ...]
    # What the shard holds that is not served, one line each (e.g. "column 'when'
    # (timestamp[ms]): no tensor type"): the catalog logs them.
    skipped: tuple[str, ...] = ()
    # What shapes the records besides the shard's bytes (a sidecar's options, such as
    # `_tokens.json`'s), as text: part of the shard's fingerprint. "": nothing.
    params: str = ""


@contextlib.contextmanager
def memory_is_data_loss(
    path: ShardPath, start: int | None = None, count: int = 0
) -> Iterator[None]:
    """A `MemoryError` inside becomes a `DecodeError` naming the shard and the records
    [start, start + count) (`start` None: indexing the shard)."""
    try:
        yield
    except MemoryError as e:
        what = "indexing it" if start is None else f"records [{start}, {start + count})"
        raise DecodeError(
            f"{path}: {what} ran out of memory (MemoryError: {e}); the shard declares more "
            "than this worker can hold, or the worker's memory limit is too low",
            record=start,
        ) from None


def _guard(method: Callable[..., Any], *, reads: bool) -> Callable[..., Any]:
    """`method` (index, read or read_into) with `memory_is_data_loss` around it."""
    if getattr(method, _GUARDED, False) or getattr(method, "__isabstractmethod__", False):
        return method

    @functools.wraps(method)
    def guarded(self: Any, path: ShardPath, *args: Any, **kwargs: Any) -> Any:
        where = (_arg(args, kwargs, 0, "start"), _arg(args, kwargs, 1, "count")) if reads else ()
        with memory_is_data_loss(path, *where):
            return method(self, path, *args, **kwargs)

    setattr(guarded, _GUARDED, True)
    return guarded


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if i < len(args) else kwargs.get(name, 0)


class Decoder(abc.ABC):
    """Base class of shard formats; see the module docstring."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    # A format reading the same shards that leaves media encoded (e.g. an image as its
    # JPEG bytes), used instead of this one for a dataset with transforms, so that they
    # get the encoded data; "": this format's records go to the transforms as they are.
    encoded_format: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, reads in (("index", False), ("read", True), ("read_into", True)):
            if attr in cls.__dict__:
                setattr(cls, attr, _guard(cls.__dict__[attr], reads=reads))

    @abc.abstractmethod
    def index(self, path: ShardPath) -> ShardMeta:
        """Count the records of a shard and describe their fields."""

    @abc.abstractmethod
    def read(self, path: ShardPath, start: int, count: int) -> Mapping[str, Any]:
        """Decode records [start, start + count) of a shard: an array per fixed field, a
        `Ragged` per ragged one."""

    def read_into(
        self,
        path: ShardPath,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
        schema: tuple[FieldSpec, ...],
    ) -> None:
        """Decode records [start, start + count) into `out`: one array per schema field,
        shaped (count, *field.shape), of the field's dtype, little-endian; usually views
        of the message being built. This default calls `read`, checks its arrays against
        the schema and copies them; a format that can write in place overrides it (npz:
        straight from the file into the message)."""
        with memory_is_data_loss(path, start, count):
            arrays = self.read(path, start, count)
            check_arrays(arrays, schema, start, count)
            for name, target in out.items():
                np.copyto(target, arrays[name], casting="no")

    def byte_ranges(
        self, path: ShardPath, start: int, count: int
    ) -> Mapping[str, tuple[int, int]] | None:
        """Where records [start, start + count) of every field lie in the shard's file,
        as (offset, bytes), when those bytes are exactly what a chunk carries (little-
        endian, C order, not compressed, no transform): the worker then reads them into
        the message itself, with no decoding process in between. None (this default):
        the records need decoding."""
        return None


_REGISTRY: dict[str, type[Decoder]] = {}


def register_decoder(cls: type[Decoder]) -> type[Decoder]:
    """Make a decoder class available by its `name` (usable as a class decorator)."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"decoder class {cls.__qualname__} must set a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def decoder_class(format_name: str) -> type[Decoder]:
    """The registered decoder class for a format name."""
    _load_builtin()
    try:
        return _REGISTRY[format_name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown shard format {format_name!r}; known formats: {known}") from None


def decoder_ref(format_name: str) -> str:
    """An importable "module:Class" reference to a format's decoder, for other processes."""
    cls = decoder_class(format_name)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_decoder(ref: str) -> Decoder:
    """A new decoder instance from a `decoder_ref` (imports its module if needed)."""
    import importlib

    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Decoder)):
        raise TypeError(f"{ref} is not a Decoder subclass")
    return obj()


def register_plugins(refs: tuple[str, ...] = ()) -> list[str]:
    """Register decoders named "module:Class", and those of installed packages that
    declare the entry-point group `shardstream.decoders`. Returns the format names."""
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group="shardstream.decoders"):
        names.append(register_decoder(ep.load()).name)
    for ref in refs:
        try:
            cls = type(load_decoder(ref))
        except (ImportError, AttributeError, TypeError) as exc:
            raise ValueError(f"cannot load decoder {ref!r}: {exc}") from exc
        names.append(register_decoder(cls).name)
    return names


def format_for_path(path: str) -> str:
    """The format whose decoder claims the file name's suffix."""
    _load_builtin()
    for name, cls in sorted(_REGISTRY.items()):
        if any(path.endswith(s) for s in cls.suffixes):
            return name
    known = ", ".join(
        f"{n} ({'/'.join(c.suffixes) or 'no suffix'})" for n, c in sorted(_REGISTRY.items())
    )
    raise ValueError(
        f"cannot infer the format of {path!r} from its name; "
        f"give it as NAME=GLOB:FORMAT (known: {known})"
    )


def _load_builtin() -> None:
    # The built-in formats register themselves on import.
    from shardstream.server import _csv, _jsonl, _npz, _packed, _parquet, _tokens, _wds  # noqa: F401


def check_arrays(
    arrays: Mapping[str, Any],
    schema: tuple[FieldSpec, ...],
    start: int,
    count: int,
) -> None:
    """Refuse decoded arrays that do not match the dataset's schema."""
    names = [f.name for f in schema]
    if sorted(arrays) != sorted(names):
        raise DecodeError(
            f"decoded fields {sorted(arrays)} differ from the schema's {sorted(names)}",
            record=start,
        )
    for spec in schema:
        a = arrays[spec.name]
        if spec.ragged or isinstance(a, Ragged):
            _check_ragged(spec, a, start, count)
            continue
        if not isinstance(a, np.ndarray):
            raise DecodeError(
                f"field {spec.name!r}: decoder returned {type(a).__name__}", record=start
            )
        if a.dtype.name != spec.dtype:
            raise DecodeError(
                f"field {spec.name!r}: dtype {a.dtype.name}, schema says {spec.dtype}", record=start
            )
        if a.shape != (count, *spec.shape):
            bad = start + min(len(a), count) if a.ndim and len(a) != count else start
            raise DecodeError(
                f"field {spec.name!r}: shape {a.shape}, expected {(count, *spec.shape)}",
                record=bad,
            )


def _check_ragged(spec: FieldSpec, a: Any, start: int, count: int) -> None:
    """A ragged field's `Ragged`: its records, item dtype and shape; valid UTF-8 text."""
    if not spec.ragged:
        raise DecodeError(
            f"field {spec.name!r} is ragged (records of varying length) where the schema says "
            f"fixed {spec}",
            record=start,
        )
    if not isinstance(a, Ragged):
        raise DecodeError(
            f"field {spec.name!r}: decoder returned {type(a).__name__} for the ragged field "
            f"{spec}, not a Ragged",
            record=start,
        )
    values, offsets = a.values, a.offsets
    dtype = storage_dtype(spec.dtype)
    if values.dtype != dtype or values.shape[1:] != spec.inner:
        raise DecodeError(
            f"field {spec.name!r}: items {values.dtype.name}{list(values.shape[1:])}, the "
            f"schema says {dtype.name}{list(spec.inner)} ({spec})",
            record=start,
        )
    if (
        len(a) != count
        or offsets.dtype != np.int64
        or int(offsets[0]) != 0
        or int(offsets[-1]) != len(values)
        or (count and int(np.diff(offsets).min()) < 0)
    ):
        raise DecodeError(
            f"field {spec.name!r}: {len(a)} records with inconsistent offsets, expected "
            f"{count} records",
            record=start,
        )
    if spec.dtype == "string":
        bad, why = _bad_utf8(values, offsets)
        if bad >= 0:
            raise DecodeError(
                f"field {spec.name!r} holds invalid UTF-8 at record {start + bad} ({why}); a "
                "string field must be UTF-8 (declare it bytes otherwise)",
                record=start + bad,
            )


def _bad_utf8(values: np.ndarray[Any, Any], offsets: np.ndarray[Any, Any]) -> tuple[int, str]:
    """The first record that is not valid UTF-8 on its own (-1 if none), and why."""
    try:
        values.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return int(np.searchsorted(offsets, exc.start, side="right")) - 1, exc.reason
    # Valid as a whole; each record is too unless one starts inside a character.
    starts = offsets[:-1][np.diff(offsets) > 0]
    inside = np.flatnonzero((values[starts] & 0xC0) == 0x80)
    if inside.size:
        record = int(np.searchsorted(offsets, starts[inside[0]], side="right")) - 1
        return record, "it starts inside a multi-byte character"
    return -1, ""
