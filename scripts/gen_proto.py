"""Regenerate the Python code of the policyd.v1 contract into policyd/v1/.

The generated files are committed; tests/test_contract.py regenerates them into a
temporary folder and fails when the committed ones differ (run this script then).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto" / "policyd" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT / "proto")) for p in PROTOS],
    ]
    # protoc resolves the relative proto names against -I
    import os

    cwd = os.getcwd()
    os.chdir(ROOT / "proto")
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    generate(target)
    (target / "policyd" / "v1" / "__init__.py").touch()
    print(f"generated into {target / 'policyd' / 'v1'}")
