"""The README's main job, as a new user runs it: `make run` starts policyd, a mock provider and Envoy
on the embedded default, prints a base URL and demo keys; `policyd demo` drives it with the SDK."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.servers import free_port


def test_make_run_demo_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "POLICYD_DEMO_ONCE": "1", "POLICYD_DEMO_DIR": str(tmp_path / "demo"),
        "POLICYD_GRPC_PORT": str(free_port()), "POLICYD_GATEWAY_PORT": str(free_port()),
        "POLICYD_MOCK_PORT": str(free_port()), "POLICYD_ENVOY_ADMIN_PORT": str(free_port()),
    })
    demo = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = demo.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        stdout, stderr = demo.communicate()
    logs = "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-4000:]}"
                   for log in sorted((tmp_path / "demo").glob("*.log")))
    out = stdout
    assert demo.returncode == 0, out + stderr + logs  # the logs say why policyd, Envoy or the mock did not serve
    assert re.search(r"base URL:  http://127\.0\.0\.1:\d+/v1", out)
    keys = re.findall(r"pdk_live_[A-Za-z0-9]{40}", out)
    assert len(set(keys)) == 2
    assert "alice  gpt-4o          allowed:" in out
    assert "usage captured from the stream" in out
    assert re.search(r"alice  gpt-4o-mini     background: queued, then completed \(\d+ in, \d+ out; charged "
                     r"0\.\d+ when it ended\)", out)
    assert "bob    gpt-4o          refused: model_not_allowed (HTTP 403)" in out
    assert re.search(r"bob    gpt-4o-mini     after \d+ calls: insufficient_quota \(HTTP 429\)", out)
    assert "latest usage records" in out and out.rstrip().endswith("counters checked")
    assert "\nok: " in out
    for log in (tmp_path / "demo").glob("*.log"):
        text = log.read_text(errors="replace")
        assert not any(k in text for k in keys), f"a customer key leaked into {log.name}"
        assert "mock-provider-key" not in text or log.name == "mock.log", f"a provider key leaked into {log.name}"
