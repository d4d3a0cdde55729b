"""The clients as other services get them: the Python client installed on its own in a fresh virtual
environment (no server package), the Node/TypeScript client built with npm and tested with node's
test runner, both against a live policyd; and the server image's build context."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import grpc
import pytest

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.processes import PolicydProcess

CUSTOMER = "clients-co"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    process = PolicydProcess("", f"sqlite:///{tmp / 'p.db'}", policy=str(ROOT / "policyd/samples/policy.yaml"),
                             cwd=str(tmp))
    with grpc.insecure_channel(process.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id=CUSTOMER, source="purchase",
                                                       amount=types_pb2.Money(currency="USD", nanos=10**9)))
        key = admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=CUSTOMER, plan="free", environment="production"))
    yield process, key.secret
    process.stop()


def usage_of(address: str, request_id: str) -> admin_pb2.UsageRecord:
    with grpc.insecure_channel(address) as channel:
        records = admin_pb2_grpc.AdminServiceStub(channel).ListUsage(
            admin_pb2.ListUsageRequest(customer_id=CUSTOMER, limit=1000)).records
    matching = [r for r in records if r.request_id == request_id]
    assert len(matching) == 1, f"{request_id}: {len(matching)} records"
    return matching[0]


STANDALONE = """
import importlib.util, sys
assert importlib.util.find_spec("policyd") is None, "the server package must not be installed here"
import policyd_client
from policyd_client import PolicyClient
address, key = sys.argv[1:3]
with PolicyClient(address) as policy:
    d = policy.authorize(key, "chat_completions", "gpt-4o-mini", request_id="standalone-1", prompt_bytes=300,
                         feature="standalone")
    assert d.allowed, d
    s = policy.settle("standalone-1", input_tokens=77, output_tokens=11)
    print(s.outcome, s.charge_nanos, policyd_client.__file__)
"""


@pytest.mark.slow
def test_python_client_installs_and_works_on_its_own(live, tmp_path: Path) -> None:
    process, secret = live
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT / "clients" / "python")],
                   check=True, timeout=300)
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    out = subprocess.run([str(python), str(script), process.address, secret], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    outcome, charge, location = out.stdout.split()
    assert outcome == "settled"
    assert str(env_dir) in location  # the installed copy, not this checkout
    record = usage_of(process.address, "standalone-1")
    assert (record.input_tokens, record.output_tokens, record.feature) == (77, 11, "standalone")
    assert record.charge.nanos == int(charge) > 0


def npm() -> str:
    found = shutil.which("npm")
    assert found, "npm is required (scripts/system-deps.sh installs Node.js and npm)"
    return found


@pytest.mark.slow
def test_node_client_builds_and_passes_its_tests_against_policyd(live, tmp_path: Path) -> None:
    process, secret = live
    package = tmp_path / "node"
    shutil.copytree(ROOT / "clients" / "node", package, ignore=shutil.ignore_patterns("node_modules", "dist"))
    # the package copies the contract from ../../proto at build time
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    package_dir = tmp_path / "clients" / "node"
    package_dir.parent.mkdir()
    package.rename(package_dir)
    env = {**os.environ, "POLICYD_ADDRESS": process.address, "POLICYD_TEST_KEY": secret,
           "POLICYD_TEST_CUSTOMER": CUSTOMER, "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false"}
    for step in (["ci"], ["run", "build"], ["test"]):
        out = subprocess.run([npm(), *step], cwd=package_dir, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"npm {' '.join(step)}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    passed = re.search(r"^# pass (\d+)$", out.stdout, re.M)
    failed = re.search(r"^# fail (\d+)$", out.stdout, re.M)
    tests = len(re.findall(r"^test\(", (package_dir / "test" / "client.test.ts").read_text(), re.M))
    assert passed and failed and (int(passed.group(1)), int(failed.group(1))) == (tests, 0), out.stdout[-2000:]
    record = usage_of(process.address, "node-1")
    assert (record.input_tokens, record.output_tokens, record.feature, record.thread_id) == (120, 40, "node-tests",
                                                                                             "t-node")


def test_server_image_build_context_holds_every_package(tmp_path: Path) -> None:
    """The Dockerfile's build stage copies what the wheel needs: build the wheel from exactly those files."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    build_stage = re.split(r"^FROM ", dockerfile, flags=re.M)[1]
    assert " AS build" in build_stage.splitlines()[0]
    context = tmp_path / "context"
    for line in build_stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                target = context / source
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (ROOT / source).is_dir() else shutil.copy)(ROOT / source, target)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "w"),
                          str(context)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import zipfile

    (wheel,) = (tmp_path / "w").glob("policyd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("policyd/engine.py", "policyd/lua/authorize.lua", "policyd_client/v1/policy_pb2_grpc.py",
                     "policyd_client/client.py", "policyd/migrations/env.py"):
        assert required in names, required
