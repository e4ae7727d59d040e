"""Resource bounds of the built-in decoders, from the worker's environment.

Decoders are created without arguments in every decoding process, so their
options are environment variables, which spawned decoding processes inherit.
Each decoder reads them when it is created; a bad value refuses to start.

    variable                           default   bounds
    SHARDSTREAM_READ_BUDGET_BYTES      64 MiB    memory one read may hold besides the
                                                 records it returns (npz: inflating steps;
                                                 Fortran-order arrays loaded whole, larger
                                                 ones refused at start-up, and kept)
    SHARDSTREAM_MAX_COMPRESSION_RATIO  1032      npz: a deflated member's declared size
                                                 over its compressed size (deflate's own
                                                 maximum: by default only impossible sizes
                                                 are refused; lower it to refuse bombs)
    SHARDSTREAM_MAX_IMAGE_PIXELS       2**26     wds: width x height of one image (8192 x
                                                 8192), checked from its header
"""

from __future__ import annotations

import os

__all__ = [
    "MAX_COMPRESSION_RATIO_ENV",
    "MAX_IMAGE_PIXELS_ENV",
    "READ_BUDGET_ENV",
    "env_int",
    "max_compression_ratio",
    "max_image_pixels",
    "read_budget",
]

READ_BUDGET_ENV = "SHARDSTREAM_READ_BUDGET_BYTES"
MAX_COMPRESSION_RATIO_ENV = "SHARDSTREAM_MAX_COMPRESSION_RATIO"
MAX_IMAGE_PIXELS_ENV = "SHARDSTREAM_MAX_IMAGE_PIXELS"


def env_int(name: str, default: int, high: int, low: int = 1) -> int:
    """An integer option from the environment, `default` when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {text!r}")
    return value


def read_budget() -> int:
    """Bytes one read may hold besides its records (`SHARDSTREAM_READ_BUDGET_BYTES`)."""
    return env_int(READ_BUDGET_ENV, 64 << 20, 1 << 40, low=4096)


def max_compression_ratio() -> int:
    """Most bytes a compressed byte may declare (`SHARDSTREAM_MAX_COMPRESSION_RATIO`)."""
    return env_int(MAX_COMPRESSION_RATIO_ENV, 1032, 1 << 20)


def max_image_pixels() -> int:
    """Most pixels (width x height) of one image (`SHARDSTREAM_MAX_IMAGE_PIXELS`)."""
    return env_int(MAX_IMAGE_PIXELS_ENV, 1 << 26, 1 << 40)
