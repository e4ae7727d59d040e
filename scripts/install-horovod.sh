#!/usr/bin/env bash
# Install Horovod 0.28.1 (the newest release on PyPI) with its PyTorch and Gloo back ends,
# for examples/train_torch_horovod.py and tests/test_horovod.py.
#
#   bash scripts/install-horovod.sh                        # into the active virtual env
#   PYTHON=.venv/bin/python bash scripts/install-horovod.sh # into that interpreter's env
#
# Horovod publishes no wheels, so this builds the sdist. 0.28.1 builds its extension as
# C++14, which the headers of PyTorch >= 2.1 reject; the one change made here is to build
# it as C++17. Gloo only: no MPI, TensorFlow or MXNet; CPU only (no NCCL).
#
# Needs: torch installed first (pip install -e '.[torch]'), cmake >= 3.13, g++ (C++17) and
# make. Takes about 10 minutes on 2 cores (MAKEFLAGS=-jN to change the parallelism).
# Installs `horovodrun` next to the interpreter (e.g. .venv/bin/horovodrun).
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python}

die() { echo "install-horovod: $*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' here: activate the virtual env or set PYTHON=.venv/bin/python"
for tool in cmake g++ make; do
    command -v "$tool" >/dev/null || die "'$tool' is needed to build Horovod (e.g. apt-get install cmake g++ make)"
done
"$PYTHON" -c "import torch" 2>/dev/null \
    || die "torch is not importable by $PYTHON: install it first (pip install -e '.[torch]')"
if "$PYTHON" -c "import horovod.torch" 2>/dev/null; then
    echo "install-horovod: horovod.torch is already importable by $PYTHON; nothing to do"
    exit 0
fi
prefix=$("$PYTHON" -c "import sys; print(sys.prefix)")
echo "install-horovod: building Horovod $HOROVOD_VERSION into $prefix" \
     "(torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" -q
tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
src="$work/horovod-$HOROVOD_VERSION"

# The C++17 fix, checked: a later sdist that changed these lines must not build as C++14.
for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$f" || die "could not switch $f to C++17"
done

# Build requirements, installed into the target env since the build is not isolated
# (it must see the torch installed there).
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging cffi wheel setuptools
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
MAKEFLAGS=${MAKEFLAGS:--j$(nproc)} \
    "$PYTHON" -m pip install --no-build-isolation --no-cache-dir "$src"

"$PYTHON" - <<'EOF'
import os, shutil, sys

import horovod
import horovod.torch as hvd  # noqa: F401  (the extension loads)

run = os.path.join(os.path.dirname(sys.executable), "horovodrun")
print(f"install-horovod: horovod {horovod.__version__} installed;",
      f"gloo built: {hvd.gloo_built()}; horovodrun: {run if os.path.exists(run) else shutil.which('horovodrun')}")
EOF
