"""`make bench`: run every measurement, print its table, write bench/results/latest.json."""

from __future__ import annotations

import json
from pathlib import Path

import sys

from bench import dashboard_volume, data_size, envoy_path, estimates, native, report_volume


def main() -> None:
    results = {}
    results.update(estimates.main())
    print()
    results.update(native.main([]))
    print()
    results.update(envoy_path.main([]))
    print()
    results.update(data_size.main([]))
    print()
    results.update(report_volume.main(sys.argv[1:]))
    print()
    results.update(dashboard_volume.main(sys.argv[1:]))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out / 'latest.json'}")


if __name__ == "__main__":
    main()
