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


def accuracy_vs_degree(results: Path = RESULTS / "degree_bench.json",
                       out: Path = IMG / "accuracy_vs_degree.png") -> Path:
    """Plaintext test accuracy of the ReLU network with its activations replaced by fitted
    polynomials, per degree (bench/degree_bench.py), with the HE depth of each plan and the
    encrypted agreement where it was measured."""
    data = json.loads(Path(results).read_text())
    rows = sorted(data["rows"], key=lambda r: r["degree"])
    deg = [r["degree"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(deg, acc, marker="o", label="polynomial activations (plaintext, numpy oracle)")
    relu = 100 * data["relu"]["accuracy"]
    ax.axhline(relu, color="grey", ls="--", lw=1, label=f"ReLU network ({relu:.2f}%)")
    for r, a in zip(rows, acc, strict=True):
        enc = r.get("encrypted")
        note = f"depth {r['he_depth']}" + (
            f"\nHE agree {100 * enc['agreement']:.0f}%" if enc else "")
        ax.annotate(note, (r["degree"], a), fontsize=7, ha="center", xytext=(0, 8),
                    textcoords="offset points")
    enc_pts = [(r["degree"], a) for r, a in zip(rows, acc, strict=True) if r.get("encrypted")]
    if enc_pts:
        ax.scatter(*zip(*enc_pts, strict=True), s=90, facecolors="none", edgecolors="C3",
                   label="also run encrypted (top-1 agreement noted)", zorder=3)
    lo = min(acc + [relu])
    ax.set_ylim(max(0.0, lo - 5), min(100.0, max(acc + [relu]) + 4))
    ax.set_xticks(deg)
    ax.text(0.01, 0.02, "depth: multiplicative depth of the whole encrypted plan "
            "(both activations)", transform=ax.transAxes, fontsize=7, color="grey")
    ax.set_xlabel("activation degree (least-squares fit of ReLU on calibration data)")
    ax.set_ylabel(f"test accuracy, % ({data['relu']['test_images']:,} images)")
    ax.set_title("Accuracy vs activation degree (Fashion-MNIST, CryptoNets-like CNN)")
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.06))
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def key_tradeoff(results: Path = RESULTS / "alexnet_bench.json",
                 out: Path = IMG / "alexnet_keys_tradeoff.png") -> Path:
    """AlexNet-style model: server time against evaluation-key size, one point per key budget
    (predicted by the calibrated cost model, and measured)."""
    rows = [r for r in json.loads(results.read_text())["budgets"] if "error" not in r]
    mb = [r["key_mb"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(mb, [r["predicted_ms"] / 1e3 for r in rows], "o--", label="predicted")
    meas = [(r["key_mb"], r["measured_ms"] / 1e3) for r in rows if "measured_ms" in r]
    if meas:
        ax.plot(*zip(*meas, strict=True), "s-", label="measured (median)")
    for r in rows:
        ax.annotate(f"{r['keys']} keys", (r["key_mb"], r["predicted_ms"] / 1e3), fontsize=8,
                    textcoords="offset points", xytext=(4, 6))
    ax.axvline(400, color="grey", ls=":", lw=1)
    ax.text(402, ax.get_ylim()[0], "400 MB target", fontsize=8, rotation=90, va="bottom")
    ax.set_xlabel("evaluation keys (MB, seeded)")
    ax.set_ylabel("server time per image (s)")
    ax.set_title("fmnist-alexnet: time vs key size under Galois key budgets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return Path(out)


def main() -> int:
    IMG.mkdir(parents=True, exist_ok=True)
    for out in (time_per_layer(), latency_vs_batch(), accuracy_vs_degree(), key_tradeoff()):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
