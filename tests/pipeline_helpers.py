"""Transforms for tests/test_pipelines.py (imported by workers by "module:function")."""

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
