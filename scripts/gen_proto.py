"""Regenerate the Python code of the policyd.v1 contract into clients/python/src/policyd_client/v1/.

The generated modules belong to the client package (`policyd_client.v1`), installable on its own;
the server imports the same modules, so one process never holds two copies of the contract.
protoc writes `from policyd_client.v1 import ...` (the proto path); the imports are rewritten to the
package's module path. The descriptors keep their proto file names (policyd/v1/*.proto).

The generated files are committed; tests/test_contract.py regenerates them into a temporary
folder and fails when the committed ones differ (run this script then).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted((PROTO_ROOT / "policyd" / "v1").glob("*.proto"))
PACKAGE_DIR = ROOT / "clients" / "python" / "src" / "policyd_client" / "v1"
MODULE_PATH = "policyd_client.v1"


def generate(out_dir: Path) -> None:
    """Write the generated modules (with rewritten imports) and an __init__.py into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={raw}", f"--pyi_out={raw}",
                f"--grpc_python_out={raw}", *[str(p.relative_to(PROTO_ROOT)) for p in PROTOS]]
        cwd = os.getcwd()
        os.chdir(PROTO_ROOT)  # protoc resolves the relative proto names against -I
        try:
            code = protoc.main(args)
        finally:
            os.chdir(cwd)
        if code != 0:
            raise SystemExit(f"protoc failed with {code}")
        for path in sorted((Path(raw) / "policyd" / "v1").iterdir()):
            text = path.read_text().replace("from policyd.v1 import", f"from {MODULE_PATH} import")
            text = text.replace("generated code in policyd/v1/", "generated code in policyd_client/v1/")
            (out_dir / path.name).write_text(text)
    (out_dir / "__init__.py").write_text('"""Generated from proto/policyd/v1 by scripts/gen_proto.py: do not edit."""\n')


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR
    generate(target)
    print(f"generated into {target}")
