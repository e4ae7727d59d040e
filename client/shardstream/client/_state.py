"""A rank's position as a small JSON-serialisable dict, and its checks.

    {"version": 1, "dataset": "train", "fingerprint": "...", "epoch": 3, "batches": 120,
     "world_size": 4, "rank": 1, "history": [], "options": {"seed": 7, "batch_size": 64, ...}}

`batches` are the batches of `epoch` already consumed; `history` lists earlier
interruptions of the same epoch (world size and batches at each), so that a
job resumed with another world size and interrupted again still resumes
exactly. A state saved after an epoch's last batch points at the next epoch.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shardstream.client._planner import PlanOptions
from shardstream.client._resume import Interruption
from shardstream.client.errors import StateMismatchError

VERSION = 1
# Options that decide which records a rank gets: a state only fits the same ones.
PLAN_KEYS = tuple(f.name for f in fields(PlanOptions))
# Plan options added since version 1: a state saved before one existed means this value.
ADDED_KEYS: dict[str, Any] = {"shuffle_reads": 0, "read_bytes": 0, "record_bytes": 0}


@dataclass(frozen=True, slots=True)
class LoaderState:
    dataset: str
    fingerprint: str
    epoch: int
    batches: int
    world_size: int
    rank: int
    history: tuple[Interruption, ...]
    options: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "dataset": self.dataset,
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "batches": self.batches,
            "world_size": self.world_size,
            "rank": self.rank,
            "history": [[h.world_size, h.batches] for h in self.history],
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LoaderState:
        try:
            if not _same(state["version"], VERSION):
                raise StateMismatchError(
                    f"state version {state['version']!r} is not supported (this loader: {VERSION})"
                )
            out = cls(
                dataset=_text(state, "dataset"),
                fingerprint=_text(state, "fingerprint"),
                epoch=_count(state["epoch"], "epoch"),
                batches=_count(state["batches"], "batches"),
                world_size=_count(state["world_size"], "world_size"),
                rank=_count(state["rank"], "rank"),
                history=tuple(
                    Interruption(_count(w, "history"), _count(b, "history"))
                    for w, b in state["history"]
                ),
                options=dict(state["options"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise StateMismatchError(f"not a shardstream loader state: {exc!r}") from None
        if (
            out.epoch < 0
            or out.batches < 0
            or out.world_size < 1
            or not 0 <= out.rank < out.world_size
            or any(h.world_size < 1 or h.batches < 0 for h in out.history)
        ):
            raise StateMismatchError(f"a state with impossible values: {dict(state)}")
        return out

    def interruptions(self) -> tuple[Interruption, ...]:
        """Everything that cut this epoch short, for `resume_plan` (which refuses, with
        `StateMismatchError`, one after more batches than the epoch had then)."""
        if self.batches == 0 and not self.history:
            return ()
        return (*self.history, Interruption(self.world_size, self.batches))

    def check(self, *, dataset: str, fingerprint: str, options: Mapping[str, Any]) -> list[str]:
        """How this state differs from a loader's dataset and plan options."""
        diffs = []
        if dataset != self.dataset:
            diffs.append(f"dataset {self.dataset!r} vs {dataset!r}")
        if fingerprint != self.fingerprint:
            diffs.append(
                f"dataset fingerprint {self.fingerprint} vs {fingerprint} "
                "(shards or counts changed)"
            )
        for key in PLAN_KEYS:
            saved = self.options.get(key, ADDED_KEYS.get(key))
            if not _same(saved, options.get(key)):
                diffs.append(f"{key} {saved!r} vs {options.get(key)!r}")
        return diffs


def _same(a: Any, b: Any) -> bool:
    """Equal and of one type: a state's 3.0 or True is not the loader's 3 or 1."""
    return type(a) is type(b) and bool(a == b)


def _count(value: Any, name: str) -> int:
    """A non-negative integer of a state, exactly (2.9 or "3" is no count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value!r}")
    return int(value)


def _text(state: Mapping[str, Any], name: str) -> str:
    value = state[name]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    return value
