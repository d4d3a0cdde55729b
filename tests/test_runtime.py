"""A started process: what startup made is out of the collector's passes, and threads give the event loop
the interpreter back within half a millisecond (run apart, so the test process keeps its own settings)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_settling_in_freezes_what_startup_made_and_shortens_the_thread_switch() -> None:
    script = ("import gc, json, sys\n"
              "import policyd.server\n"
              "from policyd import runtime\n"
              "before = sys.getswitchinterval()\n"
              "runtime.settle_in()\n"
              "gc.collect()\n"
              "print(json.dumps([before, sys.getswitchinterval(), gc.get_freeze_count(), len(gc.get_objects())]))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, frozen, tracked = json.loads(out.stdout)
    assert before == 0.005 and after == 0.0005
    assert frozen > 20_000 and tracked < frozen / 10  # a full pass now walks a tenth of the heap at most
