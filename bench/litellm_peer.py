"""LiteLLM's proxy as a peer, for the benchmark only (`python -m bench.envoy_path --litellm`): installed
into a virtualenv of its own (never a dependency of policyd), run with a master key and no database
or budgets, to the same mock provider and load generator as policyd.

The virtualenv lives in $POLICYD_BENCH_CACHE (default ~/.cache/policyd-bench) and is made once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LITELLM_REQUIREMENT = "litellm[proxy]==1.106.*"
MASTER_KEY = "sk-bench-master"

CONFIG = """model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{provider_port}/v1
      api_key: sk-mock
general_settings:
  master_key: {master_key}
litellm_settings:
  telemetry: false
"""


def venv() -> Path:
    root = Path(os.environ.get("POLICYD_BENCH_CACHE", Path.home() / ".cache" / "policyd-bench")) / "litellm"
    binary = root / "bin" / "litellm"
    if not binary.exists():
        print(f"installing {LITELLM_REQUIREMENT} into {root} (once; for the benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        subprocess.run([str(root / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT], check=True)
    return root


class LiteLLM:
    def __init__(self, provider_port: int, port: int, workers: int, workdir: Path) -> None:
        config = workdir / f"litellm-{port}.yaml"
        config.write_text(CONFIG.format(provider_port=provider_port, master_key=MASTER_KEY))
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        self.process = subprocess.Popen(
            [str(venv() / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", str(workers)],
            env=env, stdout=subprocess.DEVNULL, stderr=(workdir / f"litellm-{port}.log").open("wb"),
            start_new_session=True)
        self.port = port
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the LiteLLM proxy did not start") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # its workers too
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
