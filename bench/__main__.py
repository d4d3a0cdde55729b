"""`make bench`: run every measurement, print its table, write bench/results/latest.json."""

from __future__ import annotations

import json
from pathlib import Path

from bench import estimates


def main() -> None:
    results = {}
    results.update(estimates.main())
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out / 'latest.json'}")


if __name__ == "__main__":
    main()
