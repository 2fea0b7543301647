"""Plots for docs/BENCHMARKS.md from the JSON results of the benchmarks (no new measurements).

    .venv/bin/python -m bench.plots
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results"
IMG = Path(__file__).parents[1] / "docs" / "img"


def time_per_layer() -> Path:
    data = json.loads((RESULTS / "first_bench.json").read_text())["results"]
    keys = [k for k in data if k.startswith("heinfer") and data[k].get("layers")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottoms = np.zeros(len(keys))
    names = sorted({f"{i}:{layer['layer']}" for k in keys
                    for i, layer in enumerate(data[k]["layers"])})
    for name in names:
        i, layer = name.split(":")
        vals = np.array([data[k]["layers"][int(i)]["ms"] if int(i) < len(data[k]["layers"])
                         and data[k]["layers"][int(i)]["layer"] == layer else 0.0 for k in keys])
        if vals.any():
            ax.bar(range(len(keys)), vals, bottom=bottoms, label=f"{int(i) + 1}. {layer}")
            bottoms += vals
    ax.set_xticks(range(len(keys)), [k.replace("heinfer_", "") for k in keys], rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("ms per image (HE layers, one process)")
    ax.set_title("Time per layer (bench/results/first_bench.json)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = IMG / "time_per_layer.png"
    fig.savefig(out, dpi=110)
    return out


def latency_vs_batch() -> Path:
    first = json.loads((RESULTS / "first_bench.json").read_text())["results"]
    thr = json.loads((RESULTS / "throughput_bench.json").read_text())
    single_ms = first["heinfer_cryptonets"]["server_ms_median"]
    batch_s = thr["eval_s_one"][0]
    b = np.unique(np.logspace(0, np.log10(thr["batch"]), 60).astype(int))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.loglog(b, b * single_ms / 1e3, label=f"one image per request ({single_ms:.0f} ms each)")
    ax.loglog(b, np.full(len(b), batch_s), label=f"batch in slots ({batch_s:.1f} s per batch)")
    ax.set_xlabel("images to classify (one worker)")
    ax.set_ylabel("seconds until all are done")
    ax.set_title("Latency vs batch size, CryptoNets-style model (measured points, linear model)")
    cross = batch_s / (single_ms / 1e3)
    ax.axvline(cross, color="grey", ls=":", lw=1)
    ax.text(cross * 1.1, batch_s / 20, f"crossover ~{cross:.0f} images", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = IMG / "latency_vs_batch.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    IMG.mkdir(parents=True, exist_ok=True)
    for out in (time_per_layer(), latency_vs_batch()):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
