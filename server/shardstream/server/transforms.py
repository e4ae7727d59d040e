"""Built-in image transforms for a dataset's pipeline on the workers.

Name them in the worker's configuration file, with their parameters::

    [datasets.train]
    shards = "imagenet/train-*.tar"
    format = "wds"
    transforms = [
      {fn = "shardstream.server.transforms:decode_image", max_side = 512},
      {fn = "shardstream.server.transforms:random_resized_crop", size = 224},
      {fn = "shardstream.server.transforms:horizontal_flip", p = 0.5},
      {fn = "shardstream.server.transforms:to_float_chw",
       mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]},
    ]

Each is `fn(record, rng, **params) -> record` (see `shardstream.server._pipelines`):
`record` is a dict of fields, `rng` the record's `numpy.random.Generator` (a pure
function of the loader's seed, the epoch, the shard and the record's index).
They work on the field `field` ("image" unless given): encoded bytes for
`decode_image`, an (H, W, C) uint8 array for the others (what `decode_image`
gives), until `to_float_chw` makes it a normalised float32 (C, H, W) array.
Your own transforms are plain functions of the same signature in any module
the worker can import.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardstream.server._limits import MAX_IMAGE_PIXELS_ENV, max_image_pixels
from shardstream.server.errors import DecodeError

__all__ = [
    "center_crop",
    "decode_image",
    "horizontal_flip",
    "random_resized_crop",
    "resize",
    "to_float_chw",
    "to_uint8_hwc",
]

Record = dict[str, Any]
_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DecodeError(
            "the image transforms need Pillow, which is not installed: pip install "
            "'shardstream[wds]'"
        ) from None
    return Image


def _check_filter(name: str) -> str:
    """`name` if it is an interpolation's: checked before any draw or early return, so a
    typo fails on the first record (the worker's start-up probe), not on some later one."""
    if name not in _FILTERS:
        raise ValueError(f"interpolation must be one of {', '.join(_FILTERS)}, got {name!r}")
    return name


def _filter(name: str) -> Any:
    return getattr(_pil().Resampling, _check_filter(name).upper())


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from `size`: one int (square) or [height, width]."""
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    elif isinstance(size, Sequence) and len(size) == 2 and all(type(d) is int for d in size):
        h, w = size
    else:
        raise ValueError(f"size must be an int or [height, width], got {size!r}")
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _image(record: Record, field: str) -> np.ndarray[Any, Any]:
    try:
        a = record[field]
    except KeyError:
        raise ValueError(f"the record has no field {field!r} (it has {sorted(record)})") from None
    if not isinstance(a, np.ndarray) or a.ndim not in (2, 3):
        what = f"an array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(
            f"field {field!r} must be an (H, W) or (H, W, C) image array, got {what}; "
            "decode it first (decode_image)"
        )
    return a


def _to_pil(a: np.ndarray[Any, Any]) -> Any:
    if a.dtype != np.uint8:
        raise ValueError(f"this transform works on uint8 images, got {a.dtype.name}")
    return _pil().fromarray(np.ascontiguousarray(a))


def decode_image(
    record: Record,
    rng: np.random.Generator,
    *,
    field: str = "image",
    mode: str = "RGB",
    max_side: int | None = None,
    min_side: int | None = None,
) -> Record:
    """Decode an encoded image (JPEG, PNG, WebP, ...: bytes) into an (H, W, C) uint8 array
    (C = 3 for mode "RGB", 1 for "L").

    `max_side`: shrink the image so its longer side is at most this. `min_side`: a
    hint that later steps need the shorter side no smaller than this (no resize).
    With either, a JPEG is decoded at a reduced scale (Pillow's draft mode: 1/2, 1/4
    or 1/8, several times faster) that still keeps the image at least that large.
    Images of more pixels than SHARDSTREAM_MAX_IMAGE_PIXELS are refused from their
    header, before they are decoded."""
    del rng  # deterministic
    Image = _pil()
    data = record.get(field)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(
            f"field {field!r} must be an encoded image (bytes), got {type(data).__name__}"
        )
    for name, side in (("max_side", max_side), ("min_side", min_side)):
        if side is not None and (type(side) is not int or side < 1):
            raise ValueError(f"{name} must be a positive int, got {side!r}")
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        w, h = im.size
        limit = max_image_pixels()
        if w * h > limit:
            raise DecodeError(
                f"the image is {w} x {h} pixels ({w * h}), more than the limit of {limit} "
                f"({MAX_IMAGE_PIXELS_ENV}); not decoding it"
            )
        scale = 1.0
        if max_side is not None:
            scale = min(scale, max_side / max(w, h))
        if min_side is not None:
            scale = max(scale, min(1.0, min_side / min(w, h)))
        if scale < 1.0:
            im.draft(mode, (math.ceil(w * scale), math.ceil(h * scale)))
        image = im.convert(mode)
    if max_side is not None and max(image.size) > max_side:
        s = max_side / max(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    a = np.asarray(image, dtype=np.uint8)
    record[field] = a if a.ndim == 3 else a[:, :, None]
    return record


def _crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio, centered.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    record: Record,
    rng: np.random.Generator,
    *,
    size: int | Sequence[int],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    field: str = "image",
) -> Record:
    """A random crop of random area (`scale` of the image's) and aspect ratio (`ratio`,
    sampled log-uniformly), resized to `size` (int: square, or [height, width]):
    torchvision's RandomResizedCrop (10 attempts, then a center crop)."""
    out_h, out_w = _hw(size)
    _check_filter(interpolation)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] or not all(map(math.isfinite, scale)):
        raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {scale!r}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] or not all(map(math.isfinite, ratio)):
        raise ValueError(f"ratio must be [low, high] with 0 < low <= high, got {ratio!r}")
    a = _image(record, field)
    top, left, h, w = _crop_box(rng, a.shape[0], a.shape[1], scale, ratio)
    im = _to_pil(a).resize(
        (out_w, out_h), _filter(interpolation), box=(left, top, left + w, top + h)
    )
    out = np.asarray(im)
    record[field] = out if out.ndim == 3 else out[:, :, None]
    return record


def resize(
    record: Record,
    rng: np.random.Generator,
    *,
    size: int | Sequence[int],
    interpolation: str = "bilinear",
    field: str = "image",
) -> Record:
    """Resize: an int makes the shorter side `size`, keeping the aspect ratio (as
    torchvision's Resize(int)); [height, width] resizes to exactly that."""
    del rng
    _hw(size)
    _check_filter(interpolation)  # also when this image needs no resizing
    a = _image(record, field)
    height, width = a.shape[:2]
    if isinstance(size, int) and not isinstance(size, bool):
        if height <= width:
            new_h, new_w = size, int(size * width / height)
        else:
            new_h, new_w = int(size * height / width), size
    else:
        new_h, new_w = _hw(size)
    limit = max_image_pixels()
    if new_h * new_w > limit:  # an image of an odd aspect ratio (2 x 6000 -> 256 x 768000)
        raise DecodeError(
            f"resizing the {height} x {width} image to {new_h} x {new_w} would make "
            f"{new_h * new_w} pixels, more than the limit of {limit} ({MAX_IMAGE_PIXELS_ENV})"
        )
    if (new_h, new_w) != (height, width):
        out = np.asarray(_to_pil(a).resize((new_w, new_h), _filter(interpolation)))
        record[field] = out if out.ndim == 3 else out[:, :, None]
    return record


def center_crop(
    record: Record,
    rng: np.random.Generator,
    *,
    size: int | Sequence[int],
    field: str = "image",
) -> Record:
    """The central `size` (int: square, or [height, width]) of the image; an image
    smaller than that is padded with zeros first (as torchvision's CenterCrop)."""
    del rng
    out_h, out_w = _hw(size)
    a = _image(record, field)
    height, width = a.shape[:2]
    if height < out_h or width < out_w:
        pad_h, pad_w = max(0, out_h - height), max(0, out_w - width)
        pads = [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)]
        a = np.pad(a, pads + [(0, 0)] * (a.ndim - 2))
        height, width = a.shape[:2]
    top = round((height - out_h) / 2.0)
    left = round((width - out_w) / 2.0)
    record[field] = np.ascontiguousarray(a[top : top + out_h, left : left + out_w])
    return record


def horizontal_flip(
    record: Record, rng: np.random.Generator, *, p: float = 0.5, field: str = "image"
) -> Record:
    """Mirror the image left to right with probability `p` (one draw per record, whatever
    `p` is, so other transforms' draws do not depend on it). The field is checked on
    every record, flipped or not, so a wrong `field` fails on the first."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")
    a = _image(record, field)
    if rng.random() < p:
        record[field] = np.ascontiguousarray(a[:, ::-1])
    return record


def to_uint8_hwc(
    record: Record, rng: np.random.Generator, *, channels: int | None = None, field: str = "image"
) -> Record:
    """The image as a contiguous uint8 (H, W, C) array: an (H, W) image gains a channel
    axis; a float image (values in [0, 1]) is scaled to [0, 255] and rounded; with
    `channels`, a one-channel image is repeated to that many."""
    del rng
    a = _image(record, field)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype.kind == "f":
        a = np.clip(np.rint(a * 255.0), 0, 255)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255)
    a = a.astype(np.uint8, copy=False)
    if channels is not None and a.shape[2] != channels:
        if a.shape[2] != 1:
            raise ValueError(f"cannot make {channels} channels of {a.shape[2]}")
        a = np.repeat(a, channels, axis=2)
    record[field] = np.ascontiguousarray(a)
    return record


def to_float_chw(
    record: Record,
    rng: np.random.Generator,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: float = 1 / 255,
    field: str = "image",
) -> Record:
    """The (H, W, C) image as float32 (C, H, W): `(pixel * scale - mean) / std` per
    channel (mean 0 and std 1 when not given), ready for a convolutional network."""
    del rng
    a = _image(record, field)
    if a.ndim == 2:
        a = a[:, :, None]
    channels = a.shape[2]
    m = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32)
    s = np.ones(channels, np.float32) if std is None else np.asarray(std, np.float32)
    finite = np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and math.isfinite(scale)
    if m.shape != (channels,) or s.shape != (channels,) or not np.all(s > 0) or not finite:
        raise ValueError(
            f"mean and std need one finite value per channel ({channels}), std positive, "
            f"and scale finite; got mean={mean!r}, std={std!r}, scale={scale!r}"
        )
    out = np.empty((channels, a.shape[0], a.shape[1]), np.float32)
    np.multiply(a.transpose(2, 0, 1), np.float32(scale), out=out, dtype=np.float32)
    out -= m[:, None, None]
    out /= s[:, None, None]
    record[field] = out
    return record
