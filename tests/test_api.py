"""The public surface: small, sorted, importable; the generated code is current."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "package", ["shardstream.client", "shardstream.server", "shardstream._common"]
)
def test_all_is_sorted_and_importable(package: str) -> None:
    module = importlib.import_module(package)
    names = module.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name) is not None, name


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("shardstream.client", "shardstream.server"), ("shardstream.server", "shardstream.client")],
)
def test_the_client_and_the_worker_do_not_import_each_other(package: str, forbidden: str) -> None:
    """Each side loads only itself, `shardstream._common` and the wire (`shardstream.v1`);
    checked in a fresh interpreter, where nothing else has been imported yet."""
    code = (
        f"import sys, {package}\n"
        f"print(*sorted(m for m in sys.modules if m.startswith('shardstream.')), sep='\\n')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert package in loaded
    assert [m for m in loaded if m == forbidden or m.startswith(forbidden + ".")] == []
    sides = {m.split(".")[1] for m in loaded}
    assert sides <= {package.split(".")[1], "_common", "v1"}


def test_public_names() -> None:
    import shardstream.client as client
    import shardstream.server as server

    assert {"Loader", "SyncLoader", "LoaderConfig", "LoaderStatistics", "ClientSecurity",
            "check_health", "plan_epoch"} <= set(client.__all__)  # fmt: skip
    assert {"Worker", "WorkerConfig", "DatasetSpec", "Decoder", "register_decoder",
            "make_dataset"} <= set(server.__all__)  # fmt: skip


def test_errors_tree() -> None:
    from shardstream.client import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ShardstreamError)
    assert issubclass(errors.DataLossError, errors.WorkerError)
    assert issubclass(errors.ConfigError, ValueError)


def test_tune_malloc_respects_the_environment() -> None:
    import os
    import subprocess
    import sys

    code = "from shardstream.client import tune_malloc; print(tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.strip()  # fmt: skip
    assert out == "True"  # glibc here
    env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.strip()  # fmt: skip
    assert out == "False"  # the environment's choice wins


_PAGE_FAULTS = """
import asyncio, resource, sys
from shardstream.client import Loader
from shardstream.client.errors import ShardstreamError

async def start() -> None:
    loader = Loader(["127.0.0.1:9"], dataset="x", batch_size=1, describe_timeout=0.2,
                    tune_malloc=sys.argv[1] == "on")
    try:
        await loader.start()  # nothing listens: it fails, after tuning (or not)
    except ShardstreamError:
        pass
    finally:
        await loader.aclose()

asyncio.run(start())
size = 4 << 20


def message() -> bytearray:
    m = bytearray(size)
    m[::4096] = bytes(size // 4096)  # written page by page, as a received message is
    return m


before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 20 rounds of 4 messages of 4 MiB alive at once, then freed
    messages = [message() for _ in range(4)]
    del messages
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_loader_tunes_malloc_by_default_so_big_buffers_reuse_memory() -> None:
    """With the default `tune_malloc=True`, starting a Loader keeps 4 MiB buffers in the
    heap: allocating them again costs no page faults; with False each costs ~1000."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True,
                             text=True, env=env, timeout=60, check=True)  # fmt: skip
        return int(run.stdout.strip())

    tuned, untuned = faults("on"), faults("off")
    # glibc's defaults return the freed 16 MiB to the kernel every round (or mmap each
    # buffer afresh): ~1000 page faults per buffer. Tuned, the heap's pages are reused.
    # (The first round faults in either case: ~4 x 1024.)
    assert untuned > 80 * 500, (tuned, untuned)
    assert tuned < 4 * 1024 + 80 * 50, (tuned, untuned)


@pytest.mark.parametrize("package", ["shardstream.client", "shardstream.server"])
def test_grpc_verbosity_defaults_to_error_before_grpc_is_imported(package: str) -> None:
    """Importing shardstream sets GRPC_VERBOSITY=ERROR unless the user chose a level, and
    before grpc is imported (the C core reads it then); the user's choice wins."""
    import os
    import subprocess
    import sys

    code = (
        f"import sys, os, {package}; print(os.environ.get('GRPC_VERBOSITY'), 'grpc' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)  # fmt: skip
    assert run.stdout.split() == ["ERROR", "True"]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "GRPC_VERBOSITY": "DEBUG"}, timeout=60, check=True)  # fmt: skip
    assert run.stdout.split() == ["DEBUG", "True"]


async def test_wait_done_waits_times_out_and_never_cancels() -> None:
    """`wait_done`, the per-message wait of both streaming sides: True once the future is
    done, False at the timeout with the future left running, and a cancelled waiter
    leaves the future running too, with no callback of its own left on it."""
    import asyncio

    from shardstream._common import wait_done

    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    assert await wait_done(future, 0.01) is False
    assert not future.done() and not future.cancelled()
    waiter = asyncio.ensure_future(wait_done(future))
    await asyncio.sleep(0)  # the waiter is waiting
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not future.cancelled()
    assert not future._callbacks  # type: ignore[attr-defined]  # every waiter's is gone
    loop.call_soon(future.set_result, 7)
    assert await wait_done(future, None) is True and future.result() == 7
    assert await wait_done(future, 0) is True  # done already: no wait


def test_the_readme_documents_every_loader_option() -> None:
    import dataclasses
    from pathlib import Path

    from shardstream.client._options import LoaderConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Loader options", 1)[1].split("\n### ", 1)[0]
    names = [f.name for f in dataclasses.fields(LoaderConfig)]
    assert len(names) > 20
    first_cells = " ".join(row.split("|")[1] for row in table.splitlines() if row.startswith("| `"))
    assert [n for n in names if f"`{n}`" not in first_cells] == []


@pytest.mark.parametrize("where", ["a-file", "a-file/below", "/proc/shardstream-ledger"])
def test_an_unusable_ledger_dir_is_a_config_error_before_connecting(
    tmp_path: object, where: str
) -> None:
    """It was an OSError from the first epoch, after connecting (a traceback from
    `shardstream consume --ledger-dir FILE`)."""
    from pathlib import Path

    from shardstream.client import Loader
    from shardstream.client.errors import ConfigError

    base = Path(str(tmp_path))
    (base / "a-file").write_text("")
    path = where if where.startswith("/") else str(base / where)
    with pytest.raises(ConfigError, match=r"ledger_dir .* cannot be a folder"):
        Loader(["127.0.0.1:1"], dataset="t", batch_size=1, ledger_dir=path)
