"""Transforms for the pipeline tests (imported by workers by "module:function")."""

from __future__ import annotations

from typing import Any

import numpy as np


def explode(record: dict[str, Any], rng: np.random.Generator, *, at: int) -> dict[str, Any]:
    """Raise on the record whose id is `at`."""
    if int(record["id"]) == at:
        raise ValueError(f"cannot handle record id {at}")
    return record


def uneven(record: dict[str, Any], rng: np.random.Generator, *, at: int) -> dict[str, Any]:
    """Give the record whose id is `at` a longer `extra` field than the others."""
    record["extra"] = np.zeros(3 if int(record["id"]) == at else 2, np.float32)
    return record


def varying(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Give each record `tokens`: id % 5 + 1 int32 values (a length that varies)."""
    n = int(record["id"]) % 5 + 1
    record["tokens"] = np.arange(n, dtype=np.int32)
    return record


def caption(record: dict[str, Any], rng: np.random.Generator, *, at: int) -> dict[str, Any]:
    """Give each record a `caption`; the one whose id is `at` holds a lone surrogate, a
    str that has no UTF-8."""
    record["caption"] = "ok \udcff" if int(record["id"]) == at else f"record {int(record['id'])}"
    return record


def leave(record: dict[str, Any], rng: np.random.Generator, *, at: int, how: str) -> dict[str, Any]:
    """On the record whose id is `at`, raise what a script raises to stop (`how`:
    SystemExit, KeyboardInterrupt or GeneratorExit), or run out of memory (MemoryError)."""
    if int(record["id"]) == at:
        raise {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt,
               "GeneratorExit": GeneratorExit, "MemoryError": MemoryError}[how]()  # fmt: skip
    return record


def global_noise(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Noise from numpy's global generator instead of `rng` (the usual style of older
    augmentation libraries)."""
    record["noise"] = np.random.random(2).astype(np.float32)
    return record
