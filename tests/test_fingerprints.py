"""Content fingerprints: every byte counts, a cache spares restarts, manifests pin the data.

The change these tests make is the one a stamp of size and mtime misses: bytes in the
middle of a shard rewritten in place, the size unchanged and the mtime put back with
`os.utime`. Only the ctime (which `os.utime` cannot put back) and the content tell.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xxhash

from shardstream.client import Loader
from shardstream.client.errors import DatasetMismatchError, WorkersUnavailableError
from shardstream.server import DatasetSpec, make_dataset
from shardstream.server import _fingerprint as fingerprint_module
from shardstream.server._catalog import Catalog, index_in_threads
from shardstream.server._fingerprint import DigestCache, file_digest
from shardstream.server._process import WorkerProcess

from conftest import collect_epoch, ids_of, running_workers

SHAPE = (16, 16, 3)  # 768 bytes a record: 500 records make a shard of ~390 KB
SHARDS = 4
RECORDS = 2_000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_dataset(root, shards=SHARDS, records=RECORDS, shape=SHAPE)
    return root


def alter_middle(path: Path) -> int:
    """Flip 16 bytes in the middle of a file, keeping its size and (with os.utime) its
    atime and mtime, as a careless in-place rewrite or a restored backup would. Returns
    the offset of the change."""
    st = path.stat()
    assert st.st_size > 2 * 64 * 1024 + 16  # beyond the first and last 64 KiB
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        old = f.read(16)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    restamp(path, st)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    return st.st_size // 2


def restamp(path: Path, st: os.stat_result) -> None:
    """Give `path` back the atime and mtime of `st`, with a ctime other than `st`'s: each
    utime sets the ctime to now, so it is repeated until a coarse clock has ticked."""
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    while path.stat().st_ctime_ns == st.st_ctime_ns:
        time.sleep(0.005)  # polling for the clock's next tick
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def altered_id(path: Path, offset: int) -> int:
    """The id of the record whose image holds byte `offset` of an (uncompressed) npz shard."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("image.npy")
        ids = np.load(io.BytesIO(zf.read("id.npy")))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    end = info.header_offset + 30 + name_len + extra_len + info.file_size
    start = end - len(ids) * int(np.prod(SHAPE))  # the images are the member's last bytes
    assert start <= offset < end
    return int(ids[(offset - start) // int(np.prod(SHAPE))])


def assert_original(batches: list[dict[str, np.ndarray]], reference: dict[int, np.ndarray]) -> None:
    for batch in batches:
        for i, image in zip(batch["id"].tolist(), batch["image"], strict=True):
            assert np.array_equal(image, reference[i]), f"record {i} was altered"


def images_by_id(root: Path) -> dict[int, np.ndarray]:
    out = {}
    for path in sorted(root.glob("*.npz")):
        with np.load(path) as z:
            for i, image in zip(z["id"].tolist(), z["image"], strict=True):
                out[i] = image
    return out


def catalog(root: Path, cache: Path | None) -> Catalog:
    spec = DatasetSpec(name="train", pattern="*.npz", cache_dir=cache)
    return asyncio.run(index_in_threads(root, (spec,)))


def shard_fingerprints(cat: Catalog) -> dict[str, str]:
    return {s.id: s.fingerprint for s in cat.datasets["train"].shards}


# -- the fingerprint -----------------------------------------------------------------------


def test_the_digest_covers_every_byte(root: Path) -> None:
    path = root / "shard-00001.npz"
    assert file_digest(path) == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    cat = catalog(root, None)
    shard = cat.datasets["train"].by_id["shard-00001.npz"]
    assert (shard.size, shard.digest) == (path.stat().st_size, file_digest(path))


@pytest.mark.parametrize("cached", [False, True])
def test_a_change_in_the_middle_with_size_and_mtime_restored_changes_the_fingerprint(
    root: Path, tmp_path: Path, cached: bool
) -> None:
    cache = tmp_path / "cache" if cached else None
    before = catalog(root, cache)
    alter_middle(root / "shard-00002.npz")
    after = catalog(root, cache)  # a restart: with the cache, keyed by ctime too
    changed = {
        sid
        for sid, fp in shard_fingerprints(after).items()
        if shard_fingerprints(before)[sid] != fp
    }
    assert changed == {"shard-00002.npz"}
    assert after.datasets["train"].fingerprint != before.datasets["train"].fingerprint
    assert catalog(root, None).datasets["train"].fingerprint == after.datasets["train"].fingerprint


# -- the cache -----------------------------------------------------------------------------


@pytest.fixture
def digests_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the shards whose every byte was read for a digest."""
    read: list[str] = []

    def counting(path: Path | str, progress: object = None) -> str:
        read.append(Path(str(path)).name)
        return file_digest(path, progress)  # type: ignore[arg-type]

    monkeypatch.setattr(fingerprint_module, "file_digest", counting)
    return read


def test_a_restart_takes_digests_from_the_cache(
    root: Path, tmp_path: Path, digests_read: list[str]
) -> None:
    cache = tmp_path / "cache"
    first = catalog(root, cache)
    assert sorted(digests_read) == [f"shard-0000{i}.npz" for i in range(SHARDS)]
    assert (cache / "digests.sqlite3").is_file()
    digests_read.clear()
    again = catalog(root, cache)
    assert digests_read == []  # no shard read again
    assert again.datasets["train"].fingerprint == first.datasets["train"].fingerprint
    path = root / "shard-00003.npz"
    restamp(path, path.stat())  # same times, a new ctime: read again
    catalog(root, cache)
    assert digests_read == ["shard-00003.npz"]
    digests_read.clear()
    catalog(root, None)  # no cache: every shard
    assert len(digests_read) == SHARDS


def test_an_unusable_cache_is_reported_and_indexing_goes_on(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, "shardstream.index"):
        cat = catalog(root, blocker)
    assert len(cat.datasets["train"].shards) == SHARDS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "digest cache" in warnings[0] and "--cache-dir" in warnings[0]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "digests.sqlite3").write_bytes(b"not a database" * 100)
    assert DigestCache(damaged).get(root / "x", (1, 2)) is None


def test_progress_lines_give_bytes_per_second(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fingerprint_module, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, "shardstream.index"):
        catalog(root, None)
    lines = [r.getMessage() for r in caplog.records if "indexing" in r.getMessage()]
    assert lines and all("GB/s" in line and f"/{SHARDS} shards" in line for line in lines)
    assert f"indexed {SHARDS}/{SHARDS} shards, 0 digests from the cache" in caplog.text


# -- workers -------------------------------------------------------------------------------


async def test_a_running_worker_refuses_a_shard_changed_with_its_mtime_restored(
    root: Path,
) -> None:
    from shardstream.client.errors import ShardChangedError

    reference = images_by_id(root)
    async with running_workers(root, 1) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=100) as loader:
            assert len(ids_of(await collect_epoch(loader, 0))) == RECORDS
            altered_id(root / "shard-00001.npz", alter_middle(root / "shard-00001.npz"))
            delivered: list[dict[str, np.ndarray]] = []
            with pytest.raises(ShardChangedError, match=r"shard-00001\.npz"):
                async for batch in loader.epoch(1):
                    delivered.append(batch)
    assert_original(delivered, reference)  # what did arrive is the data indexed


def start_worker(root: Path, cache: Path, *extra: str) -> WorkerProcess:
    return WorkerProcess.start(
        ["--data-root", str(root), "--dataset", "train=*.npz", "--processes", "0",
         "--chunk-bytes", "16384", "--cache-dir", str(cache), *extra]
    )  # fmt: skip


async def test_a_worker_restarted_over_altered_shards_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loader that started against a worker refuses it once it comes back over shards
    altered in the middle (size and mtime restored); a loader starting against it and a
    worker over the original data refuses to start. No altered record reaches a batch."""
    original, altered = tmp_path / "a", tmp_path / "b"
    for root in (original, altered):  # two copies of the same data
        make_dataset(root, shards=SHARDS, records=RECORDS, shape=SHAPE)
    cache = tmp_path / "cache"
    reference = images_by_id(original)
    options = {"batch_size": 100, "retry_deadline": 10.0, "backoff_cap": 0.2}
    worker_b = start_worker(altered, cache)
    try:
        async with Loader([worker_b.address], dataset="train", **options) as loader:
            assert len(ids_of(await collect_epoch(loader, 0))) == RECORDS
            port = worker_b.port
            worker_b.signal(signal.SIGKILL)
            worker_b.close()
            changed = altered_id(
                altered / "shard-00002.npz", alter_middle(altered / "shard-00002.npz")
            )
            assert changed in reference  # the change reached a record's image
            worker_b = await asyncio.to_thread(start_worker, altered, cache, "--port", str(port))
            assert "indexed 4/4 shards, 3 digests from the cache" in "\n".join(worker_b.log)
            delivered: list[dict[str, np.ndarray]] = []
            with caplog.at_level(logging.ERROR, "shardstream.client"):
                with pytest.raises(WorkersUnavailableError, match=r"shard-00002\.npz"):
                    async for batch in loader.epoch(1):
                        delivered.append(batch)
            assert f"worker {worker_b.address} serves a different dataset" in caplog.text
        assert_original(delivered, reference)
        with start_worker(original, cache) as worker_a:
            with pytest.raises(DatasetMismatchError, match=r"shard 'shard-00002\.npz'"):
                async with Loader([worker_a.address, worker_b.address], dataset="train",
                                  **options):  # fmt: skip
                    pass
    finally:
        worker_b.close()


# -- manifests and `shardstream index` -------------------------------------------------------


def shardstream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serves(root: Path, *extra: str) -> bool:
    """Whether a worker over `root` starts serving (it is then stopped)."""
    with WorkerProcess.start(
        ["--data-root", str(root), "--dataset", "train=*.npz", "--processes", "0",
         "--cache-dir", "off", *extra]
    ) as w:  # fmt: skip
        return w.terminate() == 0


def refusal(root: Path, *extra: str) -> str:
    """The log of a worker over `root` that must refuse to start (exit status 1)."""
    r = subprocess.run(
        [sys.executable, "-m", "shardstream.server", "--data-root", str(root), "--dataset",
         "train=*.npz", "--processes", "0", "--port", "0", "--cache-dir", "off", *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_index_writes_a_manifest_a_worker_checks(root: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    cache = tmp_path / "cache"
    r = shardstream("index", "--data-root", str(root), "--dataset", "train=*.npz",
                    "--cache-dir", str(cache), "-o", str(manifest))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert f"indexed {SHARDS}/{SHARDS} shards" in r.stderr and "GB/s" in r.stderr
    data = json.loads(manifest.read_text())
    assert data["shardstream_manifest"] == 1 and data["digest"] == "xxh3_128"
    ds = data["datasets"]["train"]
    assert ds["format"] == "npz" and ds["records"] == RECORDS
    assert ds["schema"] == ["id:int64[scalar]", "label:int64[scalar]", "image:uint8[16x16x3]"]
    assert sorted(ds["shards"]) == [f"shard-0000{i}.npz" for i in range(SHARDS)]
    for sid, entry in ds["shards"].items():
        body = (root / sid).read_bytes()
        assert entry == {
            "size": len(body),
            "digest": xxhash.xxh3_128(body).hexdigest(),
            "records": RECORDS // SHARDS,
        }
    # the same manifest on standard output, from the cache
    r = shardstream("index", "--data-root", str(root), "--dataset", "train=*.npz",
                    "--cache-dir", str(cache))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == data
    assert f"{SHARDS} digests from the cache" in r.stderr

    assert serves(root, "--manifest", str(manifest), "--cache-dir", str(cache))
    alter_middle(root / "shard-00001.npz")
    log = refusal(root, "--manifest", str(manifest), "--cache-dir", str(cache))
    assert f"cannot serve: dataset 'train' differs from the manifest {manifest}: " in log
    assert "shard 'shard-00001.npz': content differs (same size" in log
    (root / "shard-00003.npz").unlink()
    log = refusal(root, "--manifest", str(manifest))
    assert "shard 'shard-00003.npz' is missing (it is in the manifest)" in log


def test_worker_refuses_a_manifest_without_its_dataset_or_unreadable(
    root: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.json"
    r = shardstream("index", "--data-root", str(root), "--dataset", "other=*.npz",
                    "-o", str(manifest), "--cache-dir", "off")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "dataset 'train' is not in the manifest" in refusal(root, "--manifest", str(manifest))
    manifest.write_text("{")
    assert "is not JSON" in refusal(root, "--manifest", str(manifest))
    assert "No such file" in refusal(root, "--manifest", str(tmp_path / "missing.json"))


def test_index_command_errors_are_one_line(tmp_path: Path) -> None:
    r = shardstream("index", "--data-root", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--dataset" in r.stderr
    r = shardstream("index", "--data-root", str(tmp_path), "--dataset", "train=*.npz")
    assert r.returncode == 1 and "no file under" in r.stderr and "Traceback" not in r.stderr
