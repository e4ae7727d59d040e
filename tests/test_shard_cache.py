"""The shard cache (`--shard-cache-dir`): local copies of the shards of an fsspec data root.

Unit tests drive `ShardDiskCache` on a `memory://` store; the worker tests run real
`shardstream worker` processes (and their spawned decoding processes) on a
`countfile://` store: a local directory behind an fsspec filesystem that logs
every open, registered through the `fsspec.specs` entry point of a package the
test writes, so every process of the worker finds it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import xxhash

from shardstream.client import Loader
from shardstream.server import WorkerConfig, make_dataset
from shardstream.server._config import DatasetSpec
from shardstream.server._files import open_shard, shard_stat
from shardstream.server._fingerprint import file_digest
from shardstream.server._process import WorkerProcess
from shardstream.server._shardcache import ShardDiskCache, entry_name, install
from shardstream.server.errors import CatalogError, ShardChanged

from conftest import collect_epoch, ids_of, running_workers

fsspec = pytest.importorskip("fsspec", reason="URL data roots need fsspec")

STORE = "/shardstream-cache-test"


# --- unit tests on a memory:// store ------------------------------------------------------


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The in-memory store, counting the opens of each of its files (`store.opens`)."""
    fs = fsspec.filesystem("memory")
    opens: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    real_open = type(fs)._open

    def counting_open(self: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:  # not the test's own writes
            with lock:
                opens[self._strip_protocol(path)] += 1
        return real_open(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_open", counting_open)
    fs.opens = opens
    yield fs
    if fs.exists(STORE):
        fs.rm(STORE, recursive=True)


@pytest.fixture
def open_caches() -> Iterator[list[ShardDiskCache]]:
    caches: list[ShardDiskCache] = []
    yield caches
    for cache in caches:
        cache.close()


def url(name: str) -> str:
    return f"memory://{STORE}/{name}"


def new_cache(caches: list[ShardDiskCache], directory: Path, max_bytes: int) -> ShardDiskCache:
    cache = ShardDiskCache(directory, max_bytes, root=f"memory://{STORE}")
    cache.prepare()
    caches.append(cache)
    return cache


def read(cache: ShardDiskCache, name: str) -> bytes:
    with cache.open(url(name)) as f:
        return f.read()


def copies(directory: Path) -> dict[str, int]:
    """The copies on disk: file name -> size."""
    return {p.name: p.stat().st_size for p in (directory / "shards").iterdir()}


def test_copies_are_served_and_the_least_recently_used_evicted_within_the_bound(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    for i in range(4):
        store.pipe(f"{STORE}/s{i}", bytes([i]) * 1000)
    cache = new_cache(open_caches, tmp_path, 2500)  # two copies fit, not three
    for i in (0, 1, 0):
        assert read(cache, f"s{i}") == bytes([i]) * 1000
    assert store.opens == {f"{STORE}/s0": 1, f"{STORE}/s1": 1}  # the second s0: a copy
    s = cache.statistics()
    assert (s.hits, s.misses, s.evictions, s.bytes) == (1, 2, 0, 2000)
    assert read(cache, "s2") == bytes([2]) * 1000  # evicts s1: s0 was used since
    assert sorted(copies(tmp_path)) == sorted(entry_name(url(n)) for n in ("s0", "s2"))
    assert read(cache, "s3") == bytes([3]) * 1000  # evicts s0
    assert sorted(copies(tmp_path)) == sorted(entry_name(url(n)) for n in ("s2", "s3"))
    assert read(cache, "s2") == bytes([2]) * 1000
    assert store.opens[f"{STORE}/s2"] == 1
    s = cache.statistics()
    assert (s.hits, s.misses, s.evictions, s.bytes) == (2, 4, 2, 2000)
    assert sum(copies(tmp_path).values()) <= 2500
    # Every copy's lock file goes with it.
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == sorted(copies(tmp_path))


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_a_copy_changed_on_disk_is_downloaded_again_never_served(
    store: Any,
    tmp_path: Path,
    open_caches: list[ShardDiskCache],
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = os.urandom(5000)
    store.pipe(f"{STORE}/a", data)
    cache = new_cache(open_caches, tmp_path, 1 << 20)
    assert read(cache, "a") == data
    copy = tmp_path / "shards" / entry_name(url("a"))
    st = copy.stat()
    with open(copy, "r+b") as f:
        if damage == "overwrite":  # same size, and the modification time put back
            f.seek(100)
            f.write(b"\0" * 10)
        else:
            f.truncate(4000)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING, "shardstream.cache"):
        assert read(cache, "a") == data
    assert "the copy was changed or truncated on disk" in caplog.text
    assert store.opens[f"{STORE}/a"] == 2
    assert copy.read_bytes() == data  # downloaded again
    assert read(cache, "a") == data
    s = cache.statistics()
    assert (s.hits, s.misses, s.bytes) == (1, 2, 5000)


def test_a_shard_changed_in_the_store_is_downloaded_again(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    store.pipe(f"{STORE}/a", b"old" * 100)
    cache = new_cache(open_caches, tmp_path, 1 << 20)
    assert read(cache, "a") == b"old" * 100
    store.pipe(f"{STORE}/a", b"new" * 100)  # the same size, a new time
    assert read(cache, "a") == b"new" * 100
    assert store.opens[f"{STORE}/a"] == 2
    assert copies(tmp_path) == {entry_name(url("a")): 300}


def test_a_shard_larger_than_the_bound_is_read_without_a_copy(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache], caplog: pytest.LogCaptureFixture
) -> None:
    store.pipe(f"{STORE}/big", b"b" * 1000)
    store.pipe(f"{STORE}/small", b"s" * 100)
    cache = new_cache(open_caches, tmp_path, 500)
    for _ in range(2):
        assert read(cache, "big") == b"b" * 1000
        assert read(cache, "small") == b"s" * 100
    assert store.opens == {f"{STORE}/big": 2, f"{STORE}/small": 1}
    assert copies(tmp_path) == {entry_name(url("small")): 100}
    s = cache.statistics()
    assert (s.hits, s.misses, s.bytes) == (1, 3, 100)
    with caplog.at_level(logging.WARNING, "shardstream.cache"):
        cache.expect(catalog_of(("big", b"b" * 1000), ("small", b"s" * 100)))
    (line,) = [r.getMessage() for r in caplog.records]
    assert (
        "1 shard(s) are larger than --shard-cache-bytes (500 bytes; the largest has 1000)" in line
    )


def catalog_of(*shards: tuple[str, bytes]) -> Any:
    """What `ShardDiskCache.expect` reads of a catalog, for shards of the store."""
    return SimpleNamespace(datasets={"d": SimpleNamespace(shards=[
        SimpleNamespace(path=url(name), stamp=shard_stat(url(name)), size=len(data),
                        digest=xxhash.xxh3_128_hexdigest(data))
        for name, data in shards
    ])})  # fmt: skip


def test_only_the_content_indexed_is_served_or_downloaded(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    store.pipe(f"{STORE}/a", b"a" * 100)
    cache = new_cache(open_caches, tmp_path, 1 << 20)
    assert read(cache, "a") == b"a" * 100  # downloaded while indexing: nothing to check yet
    cache.expect(catalog_of(("a", b"a" * 100)))
    assert read(cache, "a") == b"a" * 100
    assert store.opens[f"{STORE}/a"] == 1
    # The worker indexed other bytes for this very version: neither the copy nor a new
    # download of the store's bytes is served.
    cache.expect(catalog_of(("a", b"x" * 100)))
    with pytest.raises(ShardChanged, match="differs from the one indexed"):
        read(cache, "a")
    assert store.opens[f"{STORE}/a"] == 2
    assert copies(tmp_path) == {}
    assert cache.statistics().bytes == 0


def test_a_shard_changed_after_indexing_is_refused_not_downloaded(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    """A read checks the shard's stat, then opens it through the cache: a shard rewritten
    in between was downloaded and served, content the catalog does not describe (a whole
    epoch of it, found by a red-team pass). The cache knows the size and time this run
    indexed and refuses any other."""
    store.pipe(f"{STORE}/a", b"a" * 100)
    cache = new_cache(open_caches, tmp_path, 1 << 20)
    cache.expect(catalog_of(("a", b"a" * 100)))
    store.pipe(f"{STORE}/a", b"b" * 150)
    with pytest.raises(ShardChanged, match="changed since it was indexed"):
        read(cache, "a")
    assert store.opens[f"{STORE}/a"] == 0


def test_threads_opening_one_shard_at_once_download_it_once(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    data = os.urandom(3 << 20)
    store.pipe(f"{STORE}/a", data)
    cache = new_cache(open_caches, tmp_path, 1 << 30)
    start = threading.Barrier(8)

    def reader() -> bytes:
        start.wait()
        return read(cache, "a")

    with ThreadPoolExecutor(8) as pool:
        assert all(got == data for got in pool.map(lambda _: reader(), range(8)))
    assert store.opens[f"{STORE}/a"] == 1
    s = cache.statistics()
    assert (s.hits, s.misses) == (7, 1)


def test_readers_never_find_an_entry_without_its_copy_while_others_evict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Threads reading 8 shards through room for 2, each eviction's transaction held open
    a little longer (5 ms), as a busy disk would. Before, an eviction removed the copy and
    let go of its lock before its transaction committed: a reader in between found the
    entry without its copy, warned "the copy is gone" and downloaded it again. (A file://
    store: the memory store hands every reader of a file the same file object.)"""
    store = tmp_path / "store"
    store.mkdir()
    for i in range(8):
        (store / f"s{i}").write_bytes(bytes([i]) * 2000)
    cache = ShardDiskCache(tmp_path / "cache", 2 * 2000 + 100, root=f"file://{store}")
    cache.prepare()
    real = ShardDiskCache._evict

    def slow_evict(self: ShardDiskCache, *args: Any) -> bool:
        done = real(self, *args)
        if done:
            time.sleep(0.005)  # widens the window between the eviction and its commit
        return done

    monkeypatch.setattr(ShardDiskCache, "_evict", slow_evict)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            j = rng.randrange(8)
            with cache.open(f"file://{store}/s{j}") as f:
                assert f.read() == bytes([j]) * 2000

    try:
        with caplog.at_level(logging.WARNING, logger="shardstream.cache"):
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(reader, range(4)))
    finally:
        cache.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sum(copies(tmp_path / "cache").values()) <= 2 * 2000 + 100


def test_a_restart_keeps_the_copies_and_drops_what_is_left_over(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    for i in range(3):
        store.pipe(f"{STORE}/s{i}", bytes([i]) * 1000)
    cache = new_cache(open_caches, tmp_path, 10_000)
    for i in range(3):
        read(cache, f"s{i}")
    read(cache, "s0")  # s1 is now the least recently used
    cache.close()
    # What a process killed mid-download leaves, and a file the index does not know.
    (tmp_path / "shards" / (entry_name(url("s0")) + "~123-456.part")).write_bytes(b"x")
    (tmp_path / "shards" / "0123-stray").write_bytes(b"x")
    (tmp_path / "locks" / "0123-stray").write_bytes(b"")
    again = new_cache(open_caches, tmp_path, 2000)  # a smaller bound: evicts s1
    assert sorted(copies(tmp_path)) == sorted(entry_name(url(n)) for n in ("s0", "s2"))
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == sorted(copies(tmp_path))
    assert read(again, "s0") == bytes([0]) * 1000 and read(again, "s2") == bytes([2]) * 1000
    assert store.opens == {f"{STORE}/s{i}": 1 for i in range(3)}
    s = again.statistics()
    assert (s.hits, s.misses, s.evictions, s.bytes) == (2, 0, 1, 2000)


def test_a_damaged_index_is_started_anew(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    store.pipe(f"{STORE}/a", b"a" * 100)
    cache = new_cache(open_caches, tmp_path, 1 << 20)
    read(cache, "a")
    cache.close()
    for p in tmp_path.glob("index.sqlite3*"):
        p.write_bytes(b"not a database" * 100)
    again = new_cache(open_caches, tmp_path, 1 << 20)
    assert copies(tmp_path) == {}  # its copy is no entry of the new index: dropped
    assert read(again, "a") == b"a" * 100
    assert store.opens[f"{STORE}/a"] == 2


def test_an_unusable_cache_directory_is_refused_with_the_flag_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    cache = ShardDiskCache(tmp_path / "file" / "cache", 1000)
    with pytest.raises(OSError, match=r"cannot use the shard cache directory .*--shard-cache-dir"):
        cache.prepare()
    cache.close()


_PREPARE = """
import pathlib, sys
from shardstream.server._shardcache import ShardDiskCache
for line in sys.stdin:  # a directory to prepare, given to every process at once
    cache = ShardDiskCache(pathlib.Path(line.strip()), 1 << 20)
    try:
        cache.prepare()
        print("ok", flush=True)
    except OSError as exc:
        print(exc, flush=True)
    finally:
        cache.close_connections()
"""


def test_workers_preparing_one_new_directory_at_once_all_start(tmp_path: Path) -> None:
    # Setting the index's journal mode does not wait for other connections: 1 start in
    # 6 of three workers at once failed with "database is locked".
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = []
    try:
        for i in range(20):
            for p in procs:  # each is waiting on its stdin: they start together
                assert p.stdin is not None
                p.stdin.write(f"{tmp_path / str(i)}\n")
                p.stdin.flush()
            outcomes += [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            try:
                p.communicate(timeout=60)  # closes its pipes; it ends at the end of its input
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    assert [o for o in outcomes if o != "ok"] == []
    assert [p.returncode for p in procs] == [0] * len(procs)


def test_an_index_replaced_under_a_running_worker_is_the_one_it_uses(
    store: Any,
    tmp_path: Path,
    open_caches: list[ShardDiskCache],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The index deleted while a worker runs and created anew by another one starting:
    the running worker used to go on in the deleted file, so two indexes each kept their
    copies within the bound, not together (copies thrashed, the bound was exceeded)."""
    for name in "ab":
        store.pipe(f"{STORE}/{name}", name.encode() * 100)
    running = new_cache(open_caches, tmp_path, 1 << 20)
    assert read(running, "a") == b"a" * 100
    for p in tmp_path.glob("index.sqlite3*"):
        p.unlink()
    starting = new_cache(open_caches, tmp_path, 1 << 20)
    with caplog.at_level(logging.WARNING, "shardstream.cache"):
        assert read(running, "b") == b"b" * 100
    assert "was replaced: using the new one" in caplog.text
    assert starting.statistics().bytes == 100  # b's copy, in the one index both use
    assert read(starting, "b") == b"b" * 100
    assert store.opens[f"{STORE}/b"] == 1


def test_open_shard_uses_the_cache_only_under_its_root(
    store: Any, tmp_path: Path, open_caches: list[ShardDiskCache]
) -> None:
    store.pipe(f"{STORE}/a", b"a" * 100)
    store.pipe("/elsewhere/b", b"b" * 100)
    cache = new_cache(open_caches, tmp_path, 1 << 20)
    install(cache)
    for _ in range(2):
        with open_shard(url("a")) as f:
            assert f.read() == b"a" * 100
        with open_shard("memory:///elsewhere/b") as f:
            assert f.read() == b"b" * 100
        assert file_digest(url("a")) == xxhash.xxh3_128_hexdigest(b"a" * 100)
    assert store.opens == {f"{STORE}/a": 1, "/elsewhere/b": 2}
    cache.close()  # uninstalls it
    with open_shard(url("a")) as f:
        assert f.read() == b"a" * 100
    assert store.opens[f"{STORE}/a"] == 2
    store.rm("/elsewhere", recursive=True)


async def test_chained_urls_are_refused_pointing_at_the_shard_cache(
    store: Any, tmp_path: Path
) -> None:
    store.pipe(f"{STORE}/a.npz", b"x")
    for extra in ({}, {"shard_cache_dir": tmp_path / "cache"}):
        with pytest.raises(CatalogError, match=r"chained fsspec URLs .*--shard-cache-dir DIR"):
            async with running_workers(f"simplecache::memory://{STORE}", 1, **extra):
                pass


def test_config_refuses_a_shard_cache_for_a_local_root(tmp_path: Path) -> None:
    ds = (DatasetSpec.parse("t=*.npz"),)
    with pytest.raises(ValueError, match="is a local directory, read in place"):
        WorkerConfig(data_root=str(tmp_path), datasets=ds, shard_cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="shard_cache_bytes must be positive"):
        WorkerConfig(data_root="memory://x", datasets=ds, shard_cache_bytes=0)


def test_flags_and_variables(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from shardstream._common.args import UsageParser
    from shardstream.server.cli import add_worker_args, config_from_args

    def parse(*argv: str) -> WorkerConfig:
        parser = UsageParser(prog="shardstream-worker")
        add_worker_args(parser)  # reads the variables now
        return config_from_args(
            parser.parse_args(["--data-root", "memory://x", "--dataset", "t=*.npz", *argv])
        )

    monkeypatch.delenv("SHARDSTREAM_SHARD_CACHE_DIR", raising=False)
    monkeypatch.delenv("SHARDSTREAM_SHARD_CACHE_BYTES", raising=False)
    cfg = parse()
    assert (cfg.shard_cache_dir, cfg.shard_cache_bytes) == (None, 10 << 30)
    cfg = parse("--shard-cache-dir", "/var/cache/ss", "--shard-cache-bytes", "512MiB")
    assert (cfg.shard_cache_dir, cfg.shard_cache_bytes) == (Path("/var/cache/ss"), 512 << 20)
    monkeypatch.setenv("SHARDSTREAM_SHARD_CACHE_DIR", "/c")
    monkeypatch.setenv("SHARDSTREAM_SHARD_CACHE_BYTES", "2GiB")
    cfg = parse()
    assert (cfg.shard_cache_dir, cfg.shard_cache_bytes) == (Path("/c"), 2 << 30)
    monkeypatch.setenv("SHARDSTREAM_SHARD_CACHE_BYTES", "lots")
    with pytest.raises(SystemExit) as exit:
        parse()
    assert exit.value.code == 2
    assert "SHARDSTREAM_SHARD_CACHE_BYTES='lots': expected a size >= 1" in capsys.readouterr().err


async def test_in_process_worker_with_threads_serves_from_copies(
    store: Any, tmp_path: Path
) -> None:
    for p in make_dataset(tmp_path / "npz", shards=3, records=30, shape=(2,)):
        store.pipe(f"{STORE}/{p.name}", p.read_bytes())
    cache_dir = tmp_path / "cache"
    async with running_workers(
        f"memory://{STORE}", 1, datasets=("t=*.npz",), shard_cache_dir=cache_dir
    ) as (worker,):
        for epoch in range(2):
            async with Loader([worker.address], dataset="t", batch_size=7) as loader:
                assert sorted(ids_of(await collect_epoch(loader, epoch)).tolist()) == list(
                    range(30)
                )
    assert sorted(store.opens.values()) == [1, 1, 1]
    assert len(copies(cache_dir)) == 3


# --- real worker processes on a countfile:// store ----------------------------------------

COUNTFS = '''
"""A local directory as a store whose every open is logged ($SS_COUNTFS_LOG)."""
import os

from fsspec.implementations.local import LocalFileSystem


class CountingFileSystem(LocalFileSystem):
    protocol = ("countfile",)

    def _open(self, path, mode="rb", **kwargs):
        with open(os.environ["SS_COUNTFS_LOG"], "a") as log:
            log.write(f"{os.getpid()} {self._strip_protocol(path)}\\n")
        return super()._open(path, mode, **kwargs)
'''


@pytest.fixture
def countfs(tmp_path: Path) -> SimpleNamespace:
    """A csv dataset on a countfile:// store, and the environment worker processes need."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "ss_countfs.py").write_text(textwrap.dedent(COUNTFS))
    info = plugin / "ss_countfs-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ss-countfs\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fsspec.specs]\ncountfile = ss_countfs:CountingFileSystem\n"
    )
    data = tmp_path / "data"
    make_dataset(data, shards=4, records=400, shape=(3,), format="csv")
    log = tmp_path / "opens.log"
    log.write_text("")
    pythonpath = os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")]))
    return SimpleNamespace(
        root=f"countfile://{data}",
        files=sorted(str(p) for p in data.iterdir()),  # the shards and their _schema.json
        log=log,
        env={"PYTHONPATH": pythonpath, "SS_COUNTFS_LOG": str(log)},
    )


def remote_opens(countfs: SimpleNamespace) -> collections.Counter[str]:
    return collections.Counter(
        line.split(" ", 1)[1] for line in countfs.log.read_text().splitlines()
    )


def worker_args(countfs: SimpleNamespace, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--data-root", countfs.root, "--dataset", "t=part-*:csv", "--shard-cache-dir",
        str(cache_dir), "--cache-dir", "off", "--metrics-port", "0", "--chunk-bytes", "2048",
        *extra,
    ]  # fmt: skip


def start_workers(argvs: Sequence[list[str]], env: dict[str, str]) -> list[WorkerProcess]:
    """Start workers at once (each waits until it serves); none left if one fails."""
    with ThreadPoolExecutor(len(argvs)) as pool:
        futures = [pool.submit(WorkerProcess.start, argv, env=env) for argv in argvs]
    started, failed = [], None
    for future in futures:
        try:
            started.append(future.result())
        except Exception as exc:
            failed = exc
    if failed is not None:
        for w in started:
            w.close()
        raise failed
    return started


def metrics(worker: WorkerProcess) -> dict[str, float]:
    """The shard cache's metrics, scraped from the worker's --metrics-port."""
    deadline = time.monotonic() + 30
    while not (port := re.findall(r"metrics on http://[^ ]+:(\d+)/metrics", "\n".join(worker.log))):
        assert time.monotonic() < deadline, "the worker did not log its metrics port"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port[0]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(shardstream_shard_cache_\w+) (\S+)$", text, re.M)
    }


async def epoch_ids(address: str, epoch: int) -> list[int]:
    async with Loader([address], dataset="t", batch_size=16) as loader:
        return sorted(ids_of(await collect_epoch(loader, epoch)).tolist())


async def test_second_epoch_reads_nothing_from_the_store(
    countfs: SimpleNamespace, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    argv = worker_args(countfs, cache_dir, "--processes", "2")
    (worker,) = await asyncio.to_thread(start_workers, [argv], countfs.env)
    with worker:
        assert await epoch_ids(worker.address, 0) == list(range(400))
        # Indexing (digests in the server, counts in a decoding process) and the first
        # epoch (two decoding processes) opened each file of the store exactly once.
        after_first = remote_opens(countfs)
        assert after_first == {f: 1 for f in countfs.files}
        first = await asyncio.to_thread(metrics, worker)
        assert first["shardstream_shard_cache_misses_total"] == len(countfs.files)
        assert first["shardstream_shard_cache_hits_total"] >= len(countfs.files)
        size = sum(os.path.getsize(f) for f in countfs.files)
        assert first["shardstream_shard_cache_bytes"] == size
        assert first["shardstream_shard_cache_evictions_total"] == 0
        assert await epoch_ids(worker.address, 1) == list(range(400))
        assert remote_opens(countfs) == after_first
        second = await asyncio.to_thread(metrics, worker)
        assert second["shardstream_shard_cache_misses_total"] == len(countfs.files)
        assert (
            second["shardstream_shard_cache_hits_total"]
            > first["shardstream_shard_cache_hits_total"]
        )
        downloads = [line for line in worker.log if "shard cache: downloaded countfile://" in line]
        assert len(downloads) == len(countfs.files), "\n".join(worker.log)


async def test_workers_sharing_a_cache_dir_download_once_and_restart_warm(
    countfs: SimpleNamespace, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    argv = worker_args(countfs, cache_dir, "--processes", "1")
    workers = await asyncio.to_thread(start_workers, [argv, argv], countfs.env)
    with contextlib.ExitStack() as stack:
        for w in workers:
            stack.enter_context(w)
        for epoch, w in enumerate(workers):
            assert await epoch_ids(w.address, epoch) == list(range(400))
        assert remote_opens(countfs) == {f: 1 for f in countfs.files}
        for w in workers:
            assert w.terminate() == 0
    # A restarted worker indexes and serves from the copies: the store is not read.
    (worker,) = await asyncio.to_thread(start_workers, [argv], countfs.env)
    with worker:
        assert await epoch_ids(worker.address, 0) == list(range(400))
        assert remote_opens(countfs) == {f: 1 for f in countfs.files}
        m = await asyncio.to_thread(metrics, worker)
        assert m["shardstream_shard_cache_misses_total"] == 0
        assert m["shardstream_shard_cache_hits_total"] >= 2 * len(countfs.files)


async def test_a_shard_rewritten_at_the_same_size_and_time_is_served_anew_after_a_restart(
    countfs: SimpleNamespace, tmp_path: Path
) -> None:
    """A shard rewritten in the store while no worker runs, at the same size and with its
    modification time put back (only its ctime tells): the next worker indexes and serves
    the new content. Before, the digest the previous run had indexed for that size and
    time refused every download, so no worker could start on the directory again,
    restarted or not ("its content differs from the one indexed")."""
    cache_dir = tmp_path / "cache"
    argv = worker_args(countfs, cache_dir, "--processes", "1")
    (worker,) = await asyncio.to_thread(start_workers, [argv], countfs.env)
    with worker:
        assert await epoch_ids(worker.address, 0) == list(range(400))
    shard = Path(countfs.root.removeprefix("countfile://")) / "part-001"
    before = shard.stat()
    lines = shard.read_bytes().split(b"\n")
    fields = lines[1].split(b",")  # id,label,x,y,z: a label digit changes, the size stays
    fields[1] = b"7" if fields[1] != b"7" else b"3"
    lines[1] = b",".join(fields)
    shard.write_bytes(b"\n".join(lines))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size
    for _ in range(2):  # a new worker, then a restart
        (worker,) = await asyncio.to_thread(start_workers, [argv], countfs.env)
        with worker:
            assert await epoch_ids(worker.address, 0) == list(range(400))
