"""Conformal networks of 1, 2, 4, 8 blocks next to polynomial networks of the same widths.

    .venv/bin/python -m bench.conformal_bench [--images 50] [--agreement-images 500]

Conformal: encrypted on real test images (depth 2 whatever the depth); the deepest one on
`--agreement-images` images for the agreement figure. Polynomial: encrypted when the plan fits
n=8192 (depth <= 5), otherwise the compiler's prediction from this machine's calibration
(labelled "predicted"). Writes bench/results/conformal_bench.json and docs/img/conformal_depth.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heinfer_models import fashion_mnist, zoo
from heinfer_models.evaluate import evaluate_encrypted
from heinfer_packing.calibrate import load_or_calibrate
from heinfer_packing.lower import lower, plan_depth
from heinfer_packing.report import report

RESULTS = Path(__file__).parent / "results"
IMG = Path(__file__).parents[1] / "docs" / "img"
MAX_MEASURED_DEPTH = 5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--agreement-images", type=int, default=500)
    ap.add_argument("--measure-deep", action="store_true",
                    help="also evaluate deep polynomial networks encrypted (minutes per image "
                         "at n=32768) instead of pricing them with the calibration")
    ap.add_argument("--only", choices=["conformal", "polynomial"])
    ap.add_argument("--merge", action="store_true", help="update rows in the existing JSON")
    args = ap.parse_args(argv)
    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: max(args.images, args.agreement_images)])
    rows = []
    for k in args.blocks:
        conf_name, poly_name = f"fmnist-conformal-{k}", f"fmnist-polyconv-{k}"
        if conf_name in zoo.names() and args.only != "polynomial":
            net = zoo.load(conf_name)
            n = args.agreement_images if k == max(args.blocks) else args.images
            res = evaluate_encrypted(net, xs[:n], progress=False, count_ops=False)
            s = res.summary(labels[:n])
            rows.append({"family": "conformal", "blocks": k, "depth": res.plan.params.depth,
                         "ring": res.plan.params.poly_modulus_degree,
                         "plaintext_accuracy": net.metadata.get("plaintext_accuracy"),
                         "encrypted_accuracy": s["encrypted_accuracy"], "images": n,
                         "agreement": s["agreement"], "max_logit_error": s["max_logit_error"],
                         "server_ms": s["server_ms_median"], "measured": True,
                         "factor": res.plan.metadata["conformal"]["factor"],
                         "rank": res.plan.metadata["conformal"]["rank"]})
            print(rows[-1])
        if poly_name in zoo.names() and args.only != "conformal":
            model = zoo.load(poly_name)
            plan = lower(model)
            depth = plan_depth(plan.steps)
            row = {"family": "polynomial", "blocks": k, "depth": depth,
                   "ring": plan.params.poly_modulus_degree,
                   "plaintext_accuracy": model.metadata.get("plaintext_accuracy")}
            if depth <= MAX_MEASURED_DEPTH or args.measure_deep:
                res = evaluate_encrypted(model, xs[: args.images], progress=False,
                                         count_ops=False)
                s = res.summary(labels[: args.images])
                row.update(encrypted_accuracy=s["encrypted_accuracy"], images=args.images,
                           agreement=s["agreement"], max_logit_error=s["max_logit_error"],
                           server_ms=s["server_ms_median"], measured=True)
            else:
                rep = report(plan, load_or_calibrate(plan.params))
                row.update(server_ms=rep.predicted_ms, measured=False)
            rows.append(row)
            print(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "conformal_bench.json"
    if args.merge and path.exists():
        new = {(r["family"], r["blocks"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"]
                if (r["family"], r["blocks"]) not in new] + rows
    path.write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1, default=float) + "\n")
    _plot(rows)
    return 0


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for fam, marker in (("conformal", "o"), ("polynomial", "s")):
        pts = sorted((r["blocks"], r["server_ms"], r["measured"]) for r in rows
                     if r["family"] == fam)
        if not pts:
            continue
        b = [p[0] for p in pts]
        ms = [p[1] for p in pts]
        ax.plot(b, ms, marker=marker, label=fam)
        for bb, m, measured in pts:
            if not measured:
                ax.annotate("predicted", (bb, m), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("blocks")
    ax.set_ylabel("server ms per image")
    ax.set_title("Encrypted inference cost vs depth (Fashion-MNIST, one process)")
    ax.legend()
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "conformal_depth.png", dpi=110)
    print(f"wrote {IMG / 'conformal_depth.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
