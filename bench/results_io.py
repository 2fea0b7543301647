"""Where benchmarks write: bench/results/NAME.json (NAME_quick.json for --quick runs, which
git ignores)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def save_results(name: str, data: dict, quick: bool = False) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (f"{name}_quick.json" if quick else f"{name}.json")
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return out
