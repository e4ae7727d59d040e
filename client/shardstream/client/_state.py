"""A rank's position as a small JSON-serialisable dict, and its checks.

    {"version": 1, "dataset": "train", "fingerprint": "...", "epoch": 3, "batches": 120,
     "world_size": 4, "rank": 1, "history": [], "options": {"seed": 7, "batch_size": 64, ...}}

`batches` are the batches of `epoch` already consumed; `history` lists earlier
interruptions of the same epoch (world size and batches at each), so that a
job resumed with another world size and interrupted again still resumes
exactly. A state saved after an epoch's last batch points at the next epoch.
"""

from __future__ import annotations

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
ADDED_KEYS: dict[str, Any] = {"shuffle_reads": 0, "read_bytes": 0}


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
            if state["version"] != VERSION:
                raise StateMismatchError(
                    f"state version {state['version']!r} is not supported (this loader: {VERSION})"
                )
            out = cls(
                dataset=str(state["dataset"]),
                fingerprint=str(state["fingerprint"]),
                epoch=int(state["epoch"]),
                batches=int(state["batches"]),
                world_size=int(state["world_size"]),
                rank=int(state["rank"]),
                history=tuple(Interruption(int(w), int(b)) for w, b in state["history"]),
                options=dict(state["options"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
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
            if saved != options.get(key):
                diffs.append(f"{key} {saved!r} vs {options.get(key)!r}")
        return diffs
