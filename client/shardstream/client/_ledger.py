"""The delivery ledger: what each rank received, per epoch, and its audit.

With `Loader(..., ledger_dir=D)`, every rank writes, per epoch and run
segment, `D/epoch-00003/seg0-w4-r00001.jsonl`: a header (dataset, shard
record counts, plan options, world size, rank, the epoch's interruptions),
then a line per batch with the record ranges it held (`[shard, start, count]`
in delivery order, skipped records left out), and a line per resumed read
(worker, shard, record, why). A rank restored from a state starts a new
segment (`seg1-...`), so nothing is overwritten.

`audit(D)` replays the planner from the headers and checks, per epoch, that
the ranks together received every planned record exactly once; a segment
that was interrupted counts only the batches before the interruption (the
rest were delivered again after the resume).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from shardstream.client._planner import PlanOptions, RankPlan
from shardstream.client._resume import Interruption, resume_plan

Range = tuple[int, int, int]  # shard index, start, count


def slot_records(plan: RankPlan) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(shard index, record index) of every delivered record of a plan, in order."""
    shards: list[np.ndarray[Any, Any]] = []
    records: list[np.ndarray[Any, Any]] = []
    for w in plan.windows:
        if not w.reads:
            continue
        s = np.concatenate([np.full(r.count, r.shard) for r in w.reads])
        x = np.concatenate([np.arange(r.start, r.start + r.count) for r in w.reads])
        if w.take is not None:
            s, x = s[w.take], x[w.take]
        shards.append(s)
        records.append(x)
    if not shards:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(shards), np.concatenate(records)


def to_ranges(shards: np.ndarray[Any, Any], records: np.ndarray[Any, Any]) -> list[Range]:
    out: list[Range] = []
    for s, x in zip(shards.tolist(), records.tolist(), strict=True):
        if out and out[-1][0] == s and out[-1][1] + out[-1][2] == x:
            out[-1] = (s, out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, x, 1))
    return out


class LedgerWriter:
    """One rank's ledger file for one epoch segment (line-buffered: survives a SIGKILL)."""

    def __init__(self, directory: Path, header: dict[str, Any], plan: RankPlan) -> None:
        seg = len(header["history"])
        folder = Path(directory) / f"epoch-{plan.epoch:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"seg{seg}-w{plan.world_size}-r{plan.rank:05d}.jsonl"
        self._file: IO[str] | None = self.path.open("w", buffering=1)
        self._shards, self._records = slot_records(plan)
        self._batch_size = plan.batch_size
        self._index = {sid: i for i, sid in enumerate(header["shard_ids"])}
        self._skipped: set[tuple[int, int]] = set()
        # The read size too: with shuffle_reads it cuts the blocks, so the audit needs it.
        self._write({"kind": "header", **header, "read_records": plan.read_records})

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def batch(self, index: int) -> None:
        """Batch `index` of the plan reached the consumer."""
        a, b = index * self._batch_size, (index + 1) * self._batch_size
        s, x = self._shards[a:b], self._records[a:b]
        if self._skipped:
            keep = [(int(i), int(j)) not in self._skipped for i, j in zip(s, x, strict=True)]
            s, x = s[np.array(keep, dtype=bool)], x[np.array(keep, dtype=bool)]
        self._write({"kind": "batch", "index": index, "ranges": to_ranges(s, x)})

    def event(self, event: dict[str, Any]) -> None:
        """A resumed read or a skipped record (`kind` "resume" / "skip")."""
        if event["kind"] == "skip":
            self._skipped.add((self._index[event["shard"]], int(event["record"])))
        self._write(event)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _Segment:
    path: Path
    header: dict[str, Any]
    batches: list[list[Range]] = field(default_factory=list)
    resumes: int = 0
    skipped: list[tuple[int, int]] = field(default_factory=list)


def _read(path: Path) -> _Segment:
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty ledger file")
    header = json.loads(lines[0])
    seg = _Segment(path, header)
    for text in lines[1:]:
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            break  # a line cut by a crash: the batch was not recorded as received
        if line["kind"] == "batch":
            seg.batches.append([tuple(r) for r in line["ranges"]])
        elif line["kind"] == "resume":
            seg.resumes += 1
        elif line["kind"] == "skip":
            seg.skipped.append((header["shard_ids"].index(line["shard"]), int(line["record"])))
    return seg


@dataclass
class EpochAudit:
    epoch: int
    expected: int
    received: int
    missing: list[tuple[str, int, int]]  # shard id, start, count
    duplicated: list[tuple[str, int, int, int]]  # shard id, start, count, times
    resumes: int

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated


def _history_key(history: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(w), int(b)) for w, b in history)


def audit_epoch(segments: Sequence[_Segment]) -> EpochAudit:
    first = segments[0].header
    counts = first["shard_records"]
    ids = first["shard_ids"]
    options = PlanOptions(**first["options"])
    epoch = int(first["epoch"])
    read_records = int(first.get("read_records") or 1 << 30)  # older ledgers: any will do
    received: Counter[tuple[int, int]] = Counter()
    by_history = {_history_key(s.header["history"]) for s in segments}
    for seg in segments:
        h = _history_key(seg.header["history"])
        limit = len(seg.batches)
        for later in by_history:  # an interruption of this segment's run caps its batches
            if (
                len(later) == len(h) + 1
                and later[:-1] == h
                and later[-1][0] == seg.header["world_size"]
            ):
                limit = min(limit, later[-1][1])
        for batch in seg.batches[:limit]:
            for s, start, n in batch:
                for x in range(start, start + n):
                    received[(s, x)] += 1
    # What the epoch planned, from its first world size.
    roots = [s for s in segments if not s.header["history"]]
    world = int(roots[0].header["world_size"]) if roots else int(first["history"][0][0])
    expected: set[tuple[int, int]] = set()
    for r in range(world):
        plan = resume_plan(counts, epoch=epoch, rank=r, world_size=world, options=options,
                           read_records=read_records, history=[])  # fmt: skip
        sh, rec = slot_records(plan)
        expected.update(zip(sh.tolist(), rec.tolist(), strict=True))
    skipped = {x for seg in segments for x in seg.skipped}
    missing = sorted(expected - set(received) - skipped)
    dup = sorted((k, v) for k, v in received.items() if v > 1)
    return EpochAudit(
        epoch=epoch,
        expected=len(expected),
        received=sum(received.values()),
        missing=[(ids[s], a, n) for s, a, n in to_ranges(*_split(missing))],
        duplicated=_dup_ranges(dup, ids),
        resumes=sum(s.resumes for s in segments),
    )


def _split(pairs: Sequence[tuple[int, int]]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.array(pairs, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def _dup_ranges(
    dup: Sequence[tuple[tuple[int, int], int]], ids: Sequence[str]
) -> list[tuple[str, int, int, int]]:
    out: list[tuple[str, int, int, int]] = []
    for (s, x), times in dup:
        if out and out[-1][0] == ids[s] and out[-1][1] + out[-1][2] == x and out[-1][3] == times:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1, times)
        else:
            out.append((ids[s], x, 1, times))
    return out


def audit(directory: Path) -> Iterator[EpochAudit]:
    """Audit every epoch folder of a ledger directory."""
    folders = sorted(p for p in Path(directory).glob("epoch-*") if p.is_dir())
    if not folders:
        raise ValueError(f"no epoch-* folders under {directory}: not a ledger directory")
    for folder in folders:
        segments = [_read(p) for p in sorted(folder.glob("*.jsonl"))]
        if segments:
            yield audit_epoch(segments)


__all__ = ["EpochAudit", "Interruption", "LedgerWriter", "audit"]
