"""Regenerate the committed Python code for the .proto files.

    python protos/regenerate.py          # rewrite the generated files
    python protos/regenerate.py --check  # exit 1 if they differ from the .proto

Run from anywhere; needs grpcio-tools (and mypy-protobuf for the .pyi stubs).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted(HERE.glob("shardstream/**/*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={HERE}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(HERE)) for p in PROTOS),
    ]
    subprocess.run(cmd, check=True, cwd=HERE)


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root)
        for p in root.glob("shardstream/**/*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated_files(out)
        if args.check:
            committed = generated_files(HERE)
            drift = sorted(set(fresh) ^ set(committed))
            drift += [
                p
                for p in fresh
                if p in committed and not filecmp.cmp(out / p, HERE / p, shallow=False)
            ]
            if drift:
                print("generated code is stale, run: python protos/regenerate.py", file=sys.stderr)
                for p in drift:
                    print(f"  {p}", file=sys.stderr)
                return 1
            print(f"generated code up to date ({len(fresh)} files)")
            return 0
        for p in fresh:
            (HERE / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / p, HERE / p)
            print(f"wrote protos/{p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
