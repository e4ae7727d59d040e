"""The worker's errors: the tree its docstring draws, one status each, one place mapping them."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import grpc
import pytest

from shardstream.server import _catalog, _decoders, _decoding, errors
from shardstream.server._status import STATUS, StatusOnError, status_code


def test_the_docstring_draws_every_error_and_its_status() -> None:
    assert errors.__doc__ is not None
    lines = errors.__doc__.splitlines()
    for name in errors.__all__:
        (line,) = [ln for ln in lines if f"── {name} " in ln]
        cls = getattr(errors, name)
        if cls in STATUS:
            assert STATUS[cls].name in line.split(), line


def test_every_request_error_has_a_status() -> None:
    leaves = [c for c in vars(errors).values() if isinstance(c, type) and c.__subclasses__() == []]
    requests = [c for c in leaves if issubclass(c, errors.RequestError)]
    assert sorted(c.__name__ for c in requests) == sorted(c.__name__ for c in STATUS)
    assert status_code(errors.BusyError("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_errors_stay_importable_where_they_were() -> None:
    import shardstream.server as server

    assert server.DecodeError is _decoders.DecodeError is errors.DecodeError
    assert _catalog.CatalogError is errors.CatalogError
    assert _decoding.ShardChanged is errors.ShardChanged
    again = pickle.loads(pickle.dumps(errors.DecodeError("bad", record=7)))
    assert (type(again), str(again), again.record) == (errors.DecodeError, "bad", 7)


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, ...] = ()

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise _Aborted


class _Metrics:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, code: str) -> None:
        self.errors.append(code)


@pytest.mark.parametrize(
    ("error", "code", "warns"),
    [
        (errors.DataLossError("bad", dataset="d", shard="s\u00e9", record=3), "DATA_LOSS", True),
        (errors.BusyError("full"), "RESOURCE_EXHAUSTED", False),
        (errors.NotReadyError("indexing"), "UNAVAILABLE", False),
    ],
)
async def test_status_on_error_aborts_with_code_context_metric_and_log(
    error: errors.RequestError, code: str, warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    context, metrics = _Context(), _Metrics()
    with caplog.at_level(logging.WARNING, "shardstream.worker"), pytest.raises(_Aborted):
        async with StatusOnError(context, metrics):  # type: ignore[arg-type]
            raise error
    metadata = [("shardstream-dataset", error.dataset), ("shardstream-shard", error.shard)]
    if error.record is not None:
        metadata = [("shardstream-dataset", "d"), ("shardstream-shard", "s\\xe9"),
                    ("shardstream-record", "3")]  # fmt: skip
    if isinstance(error, errors.BusyError):  # busy, not a message over a size limit
        metadata.append(("shardstream-busy", "1"))
    assert context.aborted == (getattr(grpc.StatusCode, code), str(error), tuple(metadata))
    assert metrics.errors == [code]
    assert [r.getMessage() for r in caplog.records] == ([f"{code}: {error}"] if warns else [])


async def test_status_on_error_lets_other_exceptions_through() -> None:
    context, metrics = _Context(), _Metrics()
    with pytest.raises(KeyError):
        async with StatusOnError(context, metrics):  # type: ignore[arg-type]
            raise KeyError("a bug")
    assert context.aborted == () and metrics.errors == []


@pytest.mark.parametrize("fails", ["every other time", "always"])
async def test_an_io_error_reading_a_shard_is_retried_not_a_changed_shard(
    npz_root: Any, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """EIO (a disk, a network store's timeout) while a read checks its shard: the read
    goes on (UNAVAILABLE), and a shard that keeps failing ends in WorkersUnavailableError
    naming the I/O error at the retry deadline. Was: "the shard cannot be opened any
    more", FAILED_PRECONDITION: the worker was left out for good (the epoch ended with
    ShardChangedError) after one hiccup. A shard that is gone still is a changed shard."""
    import errno

    from shardstream.client import Loader
    from shardstream.client.errors import WorkersUnavailableError

    from conftest import RECORDS, running_workers

    real, calls = _decoding.shard_stat, [0]

    def flaky(path: Any) -> Any:
        calls[0] += 1
        if fails == "always" or calls[0] % 2 == 0:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    opts: dict[str, Any] = {"dataset": "train", "batch_size": 10, "read_bytes": 4096,
                            "retry_deadline": 3.0, "backoff_base": 0.02, "backoff_cap": 0.1,
                            "same_host_lane": False, "network_lane": False}  # fmt: skip
    async with running_workers(npz_root, 1, processes=0) as (worker,):
        monkeypatch.setattr(_decoding, "shard_stat", flaky)
        async with Loader([worker.address], **opts) as loader:
            if fails == "always":
                with pytest.raises(WorkersUnavailableError, match="UNAVAILABLE: cannot read shard"):
                    async for _ in loader.epoch(0):
                        pass
            else:
                ids = [int(i) for b in [b async for b in loader.epoch(0)] for i in b["id"]]
                assert sorted(ids) == list(range(RECORDS))
                assert loader.statistics().resumes >= 1
            assert not any(c.excluded for c in loader._pool.conns)  # type: ignore[union-attr]
        monkeypatch.setattr(_decoding, "shard_stat", real)

    def gone(path: Any) -> Any:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    with pytest.raises(errors.ShardChanged, match="cannot be opened any more"):
        monkeypatch.setattr(_decoding, "shard_stat", gone)
        _decoding.check_unchanged(npz_root / "x.npz", (0, 0, 0))  # type: ignore[arg-type]
