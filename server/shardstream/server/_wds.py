"""WebDataset-style tar shards (`.tar`): one record per sample, decoded with Pillow.

The files of a sample are consecutive tar members sharing a key (the member
name up to the first '.' of its base name)::

    000123.jpg    the image (.jpg, .jpeg or .png)
    000123.cls    the integer label, as text
    000123.id     optional: the record's global id, as text

    000123.txt    any other member: a field named by its extension, "string"
    000123.json   (UTF-8) for .txt and .json, "bytes" (passed through as they
    000123.bin    are, e.g. an encoded mask) for the others

Records are the samples in tar order, whose keys must increase (as strings).
Every sample of a shard has the same members (a sample missing one, or with
one more, is refused at indexing). Indexing reads the tar headers only
(no image is decoded); a read seeks straight to the members of its samples.
An image is converted to RGB, resized so that its shorter side is SIZE and
center-cropped to SIZE x SIZE, where the worker's environment sets SIZE
(`SHARDSTREAM_WDS_SIZE`, default 224): fields `image` uint8 (SIZE, SIZE, 3),
`label` int64 and, when the samples have `.id` members, `id` int64; then the
other members' fields, sorted by name. Images and other members larger than
`SHARDSTREAM_WDS_MAX_IMAGE_BYTES` (default 64 MiB) are refused before they
are read, and so is a sample whose image and other members take more bytes together
than the larger of that and `SHARDSTREAM_READ_BUDGET_BYTES`, and images of more
than `SHARDSTREAM_MAX_IMAGE_PIXELS` (width x height, default 2**26 = 8192 x 8192;
see `_limits`) from their header, before they are decoded. Pillow's own
decompression-bomb check stays on, with its own limit (`PIL.Image.MAX_IMAGE_PIXELS`,
which this module leaves alone: Pillow refuses images over twice it, ~179 Mpx by
default).

The format `wds-encoded` (`WdsEncodedDecoder`; never inferred from a suffix)
reads the same shards but leaves each image as it is stored: `image` is a
"bytes" field (the JPEG or PNG file). A wds dataset with transforms is read
with it, so that the transforms decode and augment the image themselves
(`shardstream.server.transforms.decode_image`, which checks the pixel limit).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import numpy as np

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import ShardCache, ShardPath, Stamp, open_shard, shard_stat
from shardstream.server._limits import (
    MAX_IMAGE_PIXELS_ENV,
    READ_BUDGET_ENV,
    env_int,
    max_image_pixels,
    read_budget,
)
from shardstream.v1.codec import FieldSpec
from shardstream.v1.ragged import Ragged

__all__ = ["MAX_IMAGE_BYTES_ENV", "SIZE_ENV", "WdsDecoder", "WdsEncodedDecoder"]

SIZE_ENV = "SHARDSTREAM_WDS_SIZE"
MAX_IMAGE_BYTES_ENV = "SHARDSTREAM_WDS_MAX_IMAGE_BYTES"
_IMAGE_EXTS = ("jpg", "jpeg", "png")
_SLOTS = {"cls": 1, "id": 2, **dict.fromkeys(_IMAGE_EXTS, 0)}  # member kind -> column pair
_TEXT_EXTS = ("txt", "json")  # other members served as "string" fields; the rest as "bytes"
_RESERVED = ("image", "label")  # field names the other members cannot take
_TEXT_MAX = 64  # bytes a .cls or .id member may hold
_MAX_INDEXED = 256  # shards whose index an instance keeps
_EOF_BLOCK = bytes(tarfile.BLOCKSIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Index:
    stamp: Stamp
    keys: tuple[str, ...]
    # per sample: (offset, size) of the image, the .cls and the .id member (-1, -1: none),
    # then of each member in `extras`
    members: np.ndarray[Any, np.dtype[np.int64]]
    has_id: bool
    extras: tuple[str, ...] = ()  # extensions of the other members, sorted


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DecodeError(
            "the wds format decodes images with Pillow, which is not installed: "
            "pip install 'shardstream[wds]'"
        ) from None
    return Image


def _split(path: ShardPath, name: str) -> tuple[str, str]:
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        raise DecodeError(
            f"{path}: tar member {name!r} is not named KEY.EXTENSION; every file of a "
            "WebDataset shard belongs to a sample (e.g. 000123.jpg, 000123.cls)"
        )
    return posixpath.join(folder, stem), ext.lower()


def _build_index(path: ShardPath) -> _Index:
    stamp = shard_stat(path)
    keys: list[str] = []
    rows: list[list[int]] = []
    others: list[dict[str, tuple[int, int]]] = []  # per sample: extension -> (offset, size)
    with open_shard(path) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 -- `f` is closed
            while (info := tar.next()) is not None:
                tar.members.clear()  # type: ignore[attr-defined]  # keep no TarInfo list
                if info.isdir():
                    continue
                if not info.isreg() or info.issparse():
                    raise DecodeError(
                        f"{path}: tar member {info.name!r} is not a regular file; store the "
                        "files of a sample themselves (no links or special files)",
                        record=len(keys),
                    )
                key, ext = _split(path, info.name)
                if not keys or key != keys[-1]:
                    _check_sample(path, keys, rows)
                    if keys and key < keys[-1]:
                        raise DecodeError(
                            f"{path}: sample {key!r} comes after {keys[-1]!r} in the tar; keys "
                            "must increase in tar order and the files of a sample must be "
                            "consecutive (sort the members by key when writing the shard; "
                            "keys compare as strings, so zero-pad numbers)",
                            record=len(keys),
                        )
                    keys.append(key)
                    rows.append([-1] * 6)
                    others.append({})
                if ext not in _SLOTS:
                    if ext in others[-1] or ext in _RESERVED:
                        raise DecodeError(
                            f"{path}: sample {key!r} has "
                            + (f"two .{ext} members" if ext in others[-1] else
                               f"a member {info.name!r} whose field would be named {ext!r}, "
                               "like a field of the format (rename it)"),
                            record=len(keys) - 1,
                        )  # fmt: skip
                    others[-1][ext] = (info.offset_data, info.size)
                    continue
                slot = 2 * _SLOTS[ext]
                if rows[-1][slot] >= 0:
                    raise DecodeError(
                        f"{path}: sample {key!r} has two "
                        f"{'images' if slot == 0 else '.' + ext + ' members'} ({info.name!r} "
                        "is the second); keep one per sample",
                        record=len(keys) - 1,
                    )
                rows[-1][slot : slot + 2] = [info.offset_data, info.size]
            _check_sample(path, keys, rows)
            f.seek(tar.offset)
            if f.read(tarfile.BLOCKSIZE) != _EOF_BLOCK:
                raise DecodeError(
                    f"{path} is truncated or corrupt after byte {tar.offset} (no end-of-archive "
                    f"marker after {len(keys)} samples); rewrite the shard",
                    record=len(keys),
                )
        except tarfile.TarError as e:
            raise DecodeError(
                f"{path} is not a readable uncompressed tar ({e}): corrupt or truncated after "
                f"{len(keys)} samples; rewrite the shard",
                record=len(keys),
            ) from None
    members = np.array(rows, dtype=np.int64).reshape(-1, 6)
    has_id = bool(len(members)) and bool(members[0, 4] >= 0)
    missing = np.flatnonzero((members[:, 4] >= 0) != has_id)
    if missing.size:
        i = int(missing[0])
        raise DecodeError(
            f"{path}: sample {keys[i]!r} {'lacks' if has_id else 'has'} an .id member, "
            f"unlike sample {keys[0]!r}; give every sample of a shard an .id, or none",
            record=i,
        )
    extras = tuple(sorted(others[0])) if others else ()
    for i, found in enumerate(others):
        if tuple(sorted(found)) != extras:
            differ = sorted(set(found) ^ set(extras))
            raise DecodeError(
                f"{path}: sample {keys[i]!r} (record {i}) has members "
                f"{['.' + e for e in sorted(found)]} besides its image and label, sample "
                f"{keys[0]!r} has {['.' + e for e in extras]} (differing: {differ}); every "
                "sample of a shard needs the same members",
                record=i,
            )
    if extras:
        spans = np.array([[v for e in extras for v in found[e]] for found in others], np.int64)
        members = np.concatenate([members, spans.reshape(len(keys), -1)], axis=1)
    return _Index(stamp=stamp, keys=tuple(keys), members=members, has_id=has_id, extras=extras)


def _check_sample(path: ShardPath, keys: list[str], rows: list[list[int]]) -> None:
    if not keys:
        return
    for slot, what in ((0, "image (.jpg, .jpeg or .png)"), (2, "label (.cls)")):
        if rows[-1][slot] < 0:
            raise DecodeError(
                f"{path}: sample {keys[-1]!r} (record {len(keys) - 1}) has no {what}; every "
                "sample needs an image and a label",
                record=len(keys) - 1,
            )


def _read_at(f: IO[bytes], offset: int, size: int, where: str, record: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise DecodeError(f"{where}: the shard ends inside this member (truncated)", record=record)
    return data


def _integer(data: bytes, where: str, record: int) -> int:
    try:
        value = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DecodeError(
            f"{where} holds {data[:_TEXT_MAX]!r}, not an integer", record=record
        ) from None
    if not -(2**63) <= value < 2**63:
        raise DecodeError(f"{where} holds {value}, out of the int64 range", record=record)
    return value


def _decode_image(
    image: Any, data: bytes, size: int, max_pixels: int, where: str, record: int
) -> np.ndarray[Any, Any]:
    with image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:  # reads the header
        w, h = im.size
        if w * h > max_pixels:
            raise DecodeError(
                f"{where}: its image is {w} x {h} pixels ({w * h}), more than the limit of "
                f"{max_pixels} ({MAX_IMAGE_PIXELS_ENV}); not decoding it",
                record=record,
            )
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size, much faster
        rgb = im.convert("RGB")
    w, h = rgb.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((w, h), image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


@register_decoder
class WdsDecoder(Decoder):
    """Decoder of WebDataset-style `.tar` shards (images + .cls labels, optional .id,
    other members as string or bytes fields)."""

    name = "wds"
    suffixes: ClassVar[tuple[str, ...]] = (".tar",)
    encoded_format = "wds-encoded"
    encoded: ClassVar[bool] = False  # True: `image` is the stored file's bytes, not decoded

    def __init__(self) -> None:
        self.size = env_int(SIZE_ENV, 224, 8192)
        self.max_image_bytes = env_int(MAX_IMAGE_BYTES_ENV, 64 << 20, 1 << 31)
        self.max_image_pixels = max_image_pixels()
        # Most bytes of one sample's image and other members together (each member alone:
        # `max_image_bytes`): the larger of that and the read budget.
        self.max_sample_bytes = max(self.max_image_bytes, read_budget())
        self._indexes: ShardCache[_Index] = ShardCache(_build_index, _MAX_INDEXED)

    def index(self, path: ShardPath) -> ShardMeta:
        _pillow()  # refuse at start-up, not at the first read, when Pillow is missing
        idx = self._index(path)
        image = (
            FieldSpec(name="image", dtype="bytes", shape=())
            if self.encoded
            else FieldSpec(name="image", dtype="uint8", shape=(self.size, self.size, 3))
        )
        schema: tuple[FieldSpec, ...] = (
            image,
            FieldSpec(name="label", dtype="int64", shape=()),
        )
        if idx.has_id:
            schema = (FieldSpec(name="id", dtype="int64", shape=()), *schema)
        schema += tuple(FieldSpec(name=e, dtype=_extra_dtype(e), shape=()) for e in idx.extras)
        return ShardMeta(records=len(idx.keys), schema=schema)

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, Any]:
        if start < 0 or count < 0:
            raise ValueError(f"`start` and `count` must be non-negative, got {start} and {count}")
        image = None if self.encoded else _pillow()
        idx = self._index(path)
        if start + count > len(idx.keys):
            raise DecodeError(
                f"{path} has {len(idx.keys)} samples, cannot read [{start}, {start + count}); "
                "did the shard change since it was indexed?",
                record=max(start, len(idx.keys)),
            )
        s = self.size
        out: dict[str, np.ndarray[Any, Any]] = {"label": np.empty(count, np.int64)}
        if not self.encoded:
            out["image"] = np.empty((count, s, s, 3), np.uint8)
        if idx.has_id:
            out["id"] = np.empty(count, np.int64)
        texts: dict[str, list[bytes]] = {e: [] for e in idx.extras}
        if self.encoded:
            texts["image"] = []
        if not count:
            return {**out, **{e: Ragged.from_bytes([]) for e in texts}}
        self._check_samples(path, idx, start, count)
        with open_shard(path) as f:
            for i in range(count):
                record = start + i
                where = f"{path}: sample {idx.keys[record]!r} (record {record})"
                row = idx.members[record].tolist()
                img_at, img_size, cls_at, cls_size, id_at, id_size = row[:6]
                for j, ext in enumerate(idx.extras):
                    at, size = row[6 + 2 * j : 8 + 2 * j]
                    if size > self.max_image_bytes:
                        raise DecodeError(
                            f"{where}: its .{ext} member takes {size} bytes, more than the "
                            f"limit of {self.max_image_bytes} ({MAX_IMAGE_BYTES_ENV})",
                            record=record,
                        )
                    texts[ext].append(_read_at(f, at, size, where, record))
                if img_size > self.max_image_bytes:
                    raise DecodeError(
                        f"{where}: its image takes {img_size} bytes, more than the limit of "
                        f"{self.max_image_bytes} ({MAX_IMAGE_BYTES_ENV}); not reading it",
                        record=record,
                    )
                for what, size in ((".cls", cls_size), (".id", id_size)):
                    if size > _TEXT_MAX:
                        raise DecodeError(
                            f"{where}: its {what} member takes {size} bytes; an integer as "
                            f"text takes at most {_TEXT_MAX}",
                            record=record,
                        )
                data = _read_at(f, img_at, img_size, where, record)
                if self.encoded:
                    texts["image"].append(data)
                else:
                    out["image"][i] = self._decoded(image, data, where, record)
                label = _read_at(f, cls_at, cls_size, where, record)
                out["label"][i] = _integer(label, f"{where}: its .cls member", record)
                if idx.has_id:
                    text = _read_at(f, id_at, id_size, where, record)
                    out["id"][i] = _integer(text, f"{where}: its .id member", record)
        return {**out, **{e: Ragged.from_bytes(items) for e, items in texts.items()}}

    def _check_samples(self, path: ShardPath, idx: _Index, start: int, count: int) -> None:
        """Refuse, before anything is read, a sample whose image and other members take
        more bytes together than a sample may hold (`max_sample_bytes`): each member is
        checked alone as it is read, but a sample may have any number of them."""
        spans = idx.members[start : start + count]
        sizes = spans[:, 1::2].copy()
        sizes[:, 1:3] = 0  # .cls and .id: at most _TEXT_MAX bytes each, checked as read
        totals = sizes.sum(axis=1)
        over = np.flatnonzero(totals > self.max_sample_bytes)
        if over.size:
            record = start + int(over[0])
            raise DecodeError(
                f"{path}: sample {idx.keys[record]!r} (record {record}): its image and other "
                f"members take {int(totals[over[0]])} bytes together, more than a sample may "
                f"hold ({self.max_sample_bytes}: the larger of {MAX_IMAGE_BYTES_ENV} and "
                f"{READ_BUDGET_ENV}); not reading them",
                record=record,
            )

    def _decoded(self, image: Any, data: bytes, where: str, record: int) -> np.ndarray[Any, Any]:
        try:
            return _decode_image(image, data, self.size, self.max_image_pixels, where, record)
        except DecodeError:
            raise
        except Exception as e:  # anything Pillow raises means an undecodable image
            # (its DecompressionBombError, or its Warning when warnings are errors)
            raise DecodeError(
                f"{where}: cannot decode its image: {type(e).__name__}: {e}", record=record
            ) from None

    def _index(self, path: ShardPath) -> _Index:
        return self._indexes.get(path)


@register_decoder
class WdsEncodedDecoder(WdsDecoder):
    """`WdsDecoder` with each image as its stored bytes (for transforms to decode)."""

    name = "wds-encoded"
    suffixes = ()
    encoded_format = ""
    encoded = True


def _extra_dtype(ext: str) -> str:
    return "string" if ext in _TEXT_EXTS else "bytes"
