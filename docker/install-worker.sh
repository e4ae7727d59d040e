#!/bin/sh
# Installs a shardstream worker with every feature the image promises, in two steps:
#
#   install-worker.sh wheels SOURCE WHEELS   build SOURCE (a checkout) and fetch everything it
#                                            needs with the extras below, as wheels in WHEELS
#   install-worker.sh install WHEELS         install from WHEELS only (no package index),
#                                            then check that every feature imports
#
# docker/Dockerfile runs `wheels` in its builder stage and `install` in its runtime stage;
# tests/test_image_install.py runs both, the same way, into a fresh virtualenv and serves
# each feature from it. PYTHON names the interpreter whose environment gets the worker
# (default: python3). pip's own settings apply (the image sets PIP_NO_CACHE_DIR=1).
#
# The extras: what a worker is documented to support beyond npz / csv on a local disk.
#   metrics   --metrics-port (prometheus-client)
#   wds       WebDataset .tar shards (Pillow)
#   parquet   Parquet shards (pyarrow)
#   fsspec    URL data roots (file://, memory://, ...)
#   cloud     s3:// and gs:// data roots (s3fs, gcsfs; credentials from AWS_* / GOOGLE_*)
set -eu

EXTRAS="metrics,wds,parquet,fsspec,cloud"
PYTHON="${PYTHON:-python3}"

usage() {
    echo "usage: $0 wheels SOURCE WHEELS | $0 install WHEELS" >&2
    exit 2
}

case "${1:-}" in
wheels)
    [ "$#" -eq 3 ] || usage
    "$PYTHON" -m pip wheel --wheel-dir "$3" "$2[$EXTRAS]"
    ;;
install)
    [ "$#" -eq 2 ] || usage
    "$PYTHON" -m pip install --no-index --find-links "$2" "shardstream[$EXTRAS]"
    "$PYTHON" -m pip check
    # Fail the build, not the first request, if a feature cannot load.
    "$PYTHON" -c '
import fsspec, PIL.Image, prometheus_client, pyarrow.parquet
from shardstream.server import cli
for protocol in ("file", "s3", "gs"):
    fsspec.get_filesystem_class(protocol)
print("shardstream worker installed: npz, csv, wds, parquet; file://, s3://, gs://; metrics")
'
    ;;
*)
    usage
    ;;
esac
