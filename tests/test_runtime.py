"""A started process: what startup made is out of the collector's passes, and threads give the event loop
the interpreter back within half a millisecond (run apart, so the test process keeps its own settings)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

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


def _lag_samples() -> tuple[float, float]:
    """policyd_event_loop_lag_seconds so far: samples in all, and those of 50 ms or less."""
    from policyd import metrics

    counts = {s.labels.get("le"): s.value for m in metrics.event_loop_lag_seconds.collect() for s in m.samples
              if s.name.endswith("_bucket")}
    return counts["+Inf"], counts["0.05"]


async def test_a_loop_held_up_shows_in_the_lag_it_records() -> None:
    """The watcher records how late the loop ran its timer: a callback that holds the loop 80 ms shows as
    one sample past 50 ms; while nothing holds it up, the samples stay under it."""
    from policyd import runtime

    stop = asyncio.Event()
    before_all, before_short = _lag_samples()
    watcher = asyncio.create_task(runtime.watch_loop_lag(stop, check_seconds=0.01))
    await asyncio.sleep(0.1)
    asyncio.get_running_loop().call_soon(time.sleep, 0.08)  # a callback that keeps the loop 80 ms
    await asyncio.sleep(0.1)
    stop.set()
    await watcher
    every, short = _lag_samples()
    assert every - before_all >= 3  # it kept watching
    assert (every - before_all) - (short - before_short) >= 1  # the 80 ms it was held up
