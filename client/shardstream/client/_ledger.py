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
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
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
        # Batches may be written from the consumer's thread, events from the loop's.
        self._lock = threading.Lock()
        # The read size too: with shuffle_reads it cuts the blocks, so the audit needs it.
        self._write({"kind": "header", **header, "read_records": plan.read_records})

    def _write(self, obj: dict[str, Any]) -> None:
        """One line (nothing once closed: an epoch stopped, whose consumer took no more)."""
        if self._file is not None:
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def batch(self, index: int) -> None:
        """Batch `index` of the plan reached the consumer."""
        a, b = index * self._batch_size, (index + 1) * self._batch_size
        s, x = self._shards[a:b], self._records[a:b]
        with self._lock:
            if self._skipped:
                keep = [(int(i), int(j)) not in self._skipped for i, j in zip(s, x, strict=True)]
                s, x = s[np.array(keep, dtype=bool)], x[np.array(keep, dtype=bool)]
            self._write({"kind": "batch", "index": index, "ranges": to_ranges(s, x)})

    def event(self, event: dict[str, Any]) -> None:
        """A resumed read or a skipped record (`kind` "resume" / "skip")."""
        with self._lock:
            if event["kind"] == "skip":
                self._skipped.add((self._index[event["shard"]], int(event["record"])))
            self._write(event)

    def close(self) -> None:
        with self._lock:
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


MAX_LINE_BYTES = 16 << 20  # a ledger line longer than this is no ledger's
MAX_AUDIT_RECORDS = 50_000_000  # records of one epoch an audit holds in memory
MAX_AUDIT_WORLD = 1 << 16  # ranks whose plans an audit makes
_SAME = ("dataset", "fingerprint", "shard_ids", "shard_records", "options", "epoch")


class LedgerError(ValueError):
    """A ledger file that is not what a loader writes (cut lines at its end excepted)."""


def _int(value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TypeError(f"an int >= {low}, got {json.dumps(value)[:40]}")
    return value


def _header(path: Path, header: Any) -> dict[str, Any]:
    try:
        if not isinstance(header, dict) or header.get("kind") != "header":
            raise TypeError("no header line")
        for key in ("dataset", "fingerprint"):
            if not isinstance(header[key], str):
                raise TypeError(f"{key} is not a string")
        ids, counts = header["shard_ids"], header["shard_records"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
            raise TypeError("shard_ids is not a list of strings")
        if not isinstance(counts, list) or len(counts) != len(ids):
            raise TypeError("shard_records is not a count per shard")
        if sum(_int(n) for n in counts) > MAX_AUDIT_RECORDS:
            raise ValueError(
                f"the dataset has {sum(counts)} records, more than an audit holds in memory "
                f"({MAX_AUDIT_RECORDS})"
            )
        if not isinstance(header["options"], dict):
            raise TypeError("options is not an object")
        _int(header["epoch"])
        world = _int(header["world_size"], 1)
        if not 0 <= _int(header["rank"]) < world:
            raise ValueError(f"rank {header['rank']} of {world}")
        history = header["history"]
        if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and _int(h[0], 1) and _int(h[1]) >= 0
            for h in history
        ):
            raise TypeError("history is not a list of [world size, batches]")
        if header.get("read_records") is not None:
            _int(header["read_records"], 1)
        if world > min(MAX_AUDIT_WORLD, sum(counts)):
            raise ValueError(
                f"world_size {world}: more ranks than records, or than an audit plans "
                f"({MAX_AUDIT_WORLD})"
            )
        _options(header["options"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerError(f"{path}: not a ledger header ({exc})") from None
    return header


def _options(options: dict[str, Any]) -> PlanOptions:
    """The plan options of a header, each of its field's type (JSON has no other check)."""
    kinds = {f.name: f.type for f in fields(PlanOptions)}
    for key, value in options.items():
        kind = kinds.get(key)
        if kind is None:
            raise TypeError(f"options has an unknown key {key!r}")
        want = bool if kind == "bool" else str if kind == "Remainder" else int
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
            raise TypeError(f"options.{key} is not a {want.__name__}: {json.dumps(value)[:40]}")
    return PlanOptions(**options)


def _ranges(path: Path, number: int, line: Any, counts: Sequence[int]) -> list[Range]:
    ranges = line.get("ranges")
    out: list[Range] = []
    try:
        if not isinstance(ranges, list):
            raise TypeError("no list of ranges")
        for r in ranges:
            if not isinstance(r, list) or len(r) != 3:
                raise TypeError("a range is not [shard, start, count]")
            s, start, n = _int(r[0]), _int(r[1]), _int(r[2])
            if s >= len(counts) or start + n > counts[s]:
                raise ValueError(f"[{s}, {start}, {n}] is outside the dataset's shards")
            out.append((s, start, n))
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{path}, line {number}: {exc}") from None
    return out


def _read(path: Path) -> _Segment:
    if not path.is_file():  # a device or a FIFO (a link to /dev/zero) is no ledger
        raise LedgerError(f"{path}: not a regular file")
    with path.open("rb") as f:

        def lines() -> Iterator[tuple[int, bytes]]:
            number = 0
            while text := f.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(text) > MAX_LINE_BYTES:
                    raise LedgerError(f"{path}, line {number}: longer than {MAX_LINE_BYTES} bytes")
                yield number, text

        rows = lines()
        first = next(rows, None)
        if first is None:  # (a kill before the header was written)
            raise LedgerError(f"{path}: empty ledger file")
        try:
            header = _header(path, json.loads(first[1]))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise LedgerError(f"{path}: the header line is not JSON") from None
        seg = _Segment(path, header)
        ids, counts = header["shard_ids"], header["shard_records"]
        cut = 0  # a line that is not JSON: only the last may be (cut by a crash)
        for number, text in rows:
            if cut:
                raise LedgerError(f"{path}, line {cut}: not JSON, and not the file's last line")
            try:
                line = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                cut = number  # the batch it held was not recorded as received
                continue
            if not isinstance(line, dict):
                raise LedgerError(f"{path}, line {number}: not a JSON object")
            kind = line.get("kind")
            if kind == "batch":
                seg.batches.append(_ranges(path, number, line, counts))
            elif kind == "resume":
                seg.resumes += 1
            elif kind == "skip":
                shard, record = line.get("shard"), line.get("record")
                if (
                    shard not in ids
                    or isinstance(record, bool)
                    or not isinstance(record, int)
                    or not 0 <= record < counts[ids.index(shard)]
                ):
                    raise LedgerError(f"{path}, line {number}: a skip of no record of the dataset")
                seg.skipped.append((ids.index(shard), record))
            else:
                raise LedgerError(f"{path}, line {number}: a line of kind {kind!r}")
    return seg


@dataclass
class EpochAudit:
    epoch: int
    expected: int
    received: int
    missing: list[tuple[str, int, int]]  # shard id, start, count
    duplicated: list[tuple[str, int, int, int]]  # shard id, start, count, times
    resumes: int
    unplanned: list[tuple[str, int, int]] = field(default_factory=list)  # received, not planned
    skipped: int = 0  # records the loaders left out as bad (on_error="skip")

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated and not self.unplanned


def _history_key(history: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(w), int(b)) for w, b in history)


def audit_epoch(segments: Sequence[_Segment]) -> EpochAudit:
    first = segments[0].header
    for seg in segments[1:]:  # one epoch of one dataset under one plan, or no audit
        for key in _SAME:
            if seg.header[key] != first[key]:
                raise LedgerError(
                    f"{seg.path} and {segments[0].path} disagree on {key} "
                    f"({json.dumps(seg.header[key])[:80]} vs {json.dumps(first[key])[:80]}): "
                    "not the ranks of one epoch"
                )
    worlds: dict[tuple[tuple[int, int], ...], dict[int, Path]] = {}
    for seg in segments:  # one run from each point of the epoch, or no telling which
        at = worlds.setdefault(_history_key(seg.header["history"]), {})
        at.setdefault(int(seg.header["world_size"]), seg.path)
        if len(at) > 1:
            (w1, p1), (w2, p2) = sorted(at.items())[:2]
            raise LedgerError(
                f"{p1} and {p2}: runs of {w1} and of {w2} ranks started this epoch "
                "from the same point (a restart from the same state, or from the epoch's "
                "start, with another world size): the files of the run that was abandoned "
                "are stale; move them out of the ledger, or give each run its own ledger"
            )
    counts = first["shard_records"]
    ids = first["shard_ids"]
    options = PlanOptions(**first["options"])
    epoch = int(first["epoch"])
    read_records = int(first.get("read_records") or 1 << 30)  # older ledgers: any will do
    # Records are counted by their position in the dataset (shard after shard), with
    # arrays: each range received is one +1 and one -1 in a difference array, so neither
    # a range's length nor the number of times it is repeated costs more than one step.
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))])
    total = int(offsets[-1])
    starts: list[int] = []
    ends: list[int] = []
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
                a = int(offsets[s]) + start
                starts.append(a)
                ends.append(a + n)
    received = np.bincount(np.asarray(starts, np.int64), minlength=total + 1)
    received -= np.bincount(np.asarray(ends, np.int64), minlength=total + 1)
    np.cumsum(received, out=received)
    received = received[:total]
    # What the epoch planned, from its first world size: how many times each record (a
    # `remainder="pad"` epoch plans some twice).
    roots = [s for s in segments if not s.header["history"]]
    world = int(roots[0].header["world_size"]) if roots else int(first["history"][0][0])
    planned = []
    for r in range(world):
        plan = resume_plan(counts, epoch=epoch, rank=r, world_size=world, options=options,
                           read_records=read_records, history=[])  # fmt: skip
        sh, rec = slot_records(plan)
        planned.append(offsets[sh] + rec)
    expected = np.bincount(np.concatenate(planned), minlength=total) if planned else received * 0
    if options.drop_last:  # a resumed run with whole batches only leaves out what is past them
        runs = {(_history_key(s.header["history"]), int(s.header["world_size"])) for s in segments}
        for h, w in runs:
            if not h or any(
                len(later) == len(h) + 1 and later[:-1] == h and later[-1][0] == w
                for later in by_history
            ):
                continue  # the epoch's first run, or one interrupted: its rest is planned later
            cuts = [Interruption(*cut) for cut in h]
            for r in range(w):
                plan = resume_plan(
                    counts, epoch=epoch, rank=r, world_size=w, options=options,
                    read_records=read_records, history=cuts, dropped=True,
                )  # fmt: skip
                sh, rec = slot_records(plan)
                np.subtract.at(expected, offsets[sh] + rec, 1)
    skipped = np.zeros(total, bool)
    for seg in segments:
        for s, x in seg.skipped:
            skipped[offsets[s] + x] = True
    missing = np.flatnonzero((received < expected) & ~skipped)
    unplanned = np.flatnonzero((expected == 0) & (received > 0))
    dup = np.flatnonzero((received > expected) & (expected > 0))
    return EpochAudit(
        epoch=epoch,
        expected=int(expected.sum()),
        received=int(received.sum()),
        missing=[(ids[s], a, n) for s, a, n, _ in _runs(missing, offsets)],
        duplicated=[(ids[s], a, n, t) for s, a, n, t in _runs(dup, offsets, received[dup])],
        resumes=sum(s.resumes for s in segments),
        unplanned=[(ids[s], a, n) for s, a, n, _ in _runs(unplanned, offsets)],
        skipped=int(skipped.sum()),
    )


MAX_REPORTED_RANGES = 100_000  # of each kind, in an audit's lists (a ruined ledger has many)


def _runs(
    positions: np.ndarray[Any, Any],
    offsets: np.ndarray[Any, Any],
    times: np.ndarray[Any, Any] | None = None,
) -> list[tuple[int, int, int, int]]:
    """(shard, start, count, times) of each run of consecutive dataset positions in one
    shard (with `times`: of equal times), the first `MAX_REPORTED_RANGES`."""
    if not len(positions):
        return []
    shard = np.searchsorted(offsets, positions, side="right") - 1
    t = np.zeros(len(positions), np.int64) if times is None else np.asarray(times, np.int64)
    breaks = (np.diff(positions) != 1) | (np.diff(shard) != 0) | (np.diff(t) != 0)
    heads = np.concatenate([[0], np.flatnonzero(breaks) + 1])
    lengths = np.diff(np.concatenate([heads, [len(positions)]]))
    heads, lengths = heads[:MAX_REPORTED_RANGES], lengths[:MAX_REPORTED_RANGES]
    return [
        (int(s), int(p - offsets[s]), int(n), int(k))
        for s, p, n, k in zip(shard[heads], positions[heads], lengths, t[heads], strict=True)
    ]


def audit(directory: Path) -> Iterator[EpochAudit]:
    """Audit every epoch folder of a ledger directory."""
    folders = sorted(p for p in Path(directory).glob("epoch-*") if p.is_dir())
    if not folders:
        raise ValueError(f"no epoch-* folders under {directory}: not a ledger directory")
    for folder in folders:
        segments = [_read(p) for p in sorted(folder.glob("*.jsonl"))]
        if segments:
            yield audit_epoch(segments)


__all__ = ["EpochAudit", "Interruption", "LedgerError", "LedgerWriter", "audit"]
