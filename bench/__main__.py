"""`make bench`: run every measurement, print its table, write bench/results/latest.json.

    python -m bench [--litellm] [--records N]

--litellm adds the LiteLLM proxy as a peer on the Envoy path (installed into a virtualenv of its own,
for the benchmark only); --records sizes the report, dashboard, retention and seeding volume runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import (admin_load, dashboard_volume, data_size, envoy_path, estimates, native, report_volume,
                   restore_closed, retention_volume, seeding_volume)


def main() -> None:
    args = sys.argv[1:]
    peers = ["--litellm"] if "--litellm" in args else []
    volume = [a for a in args if a != "--litellm"]
    results = {}
    results.update(estimates.main())
    print()
    results.update(native.main([]))
    print()
    results.update(envoy_path.main(peers))
    print()
    results.update(admin_load.main([]))
    print()
    results.update(data_size.main([]))
    print()
    results.update(restore_closed.main([]))
    print()
    results.update(report_volume.main(volume))
    print()
    results.update(dashboard_volume.main(volume))
    print()
    results.update(retention_volume.main(volume))
    print()
    results.update(seeding_volume.main(volume))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out / 'latest.json'}")


if __name__ == "__main__":
    main()
