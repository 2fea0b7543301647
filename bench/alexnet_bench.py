"""The AlexNet-style network: encrypted batch-1 run, time/key trade-off, full-size prediction.

    .venv/bin/python -m bench.alexnet_bench [--images 50] [--budgets 23 16 12 8] [--imagenet]
    .venv/bin/python -m bench.alexnet_bench --quick

1. `fmnist-alexnet` (zoo) encrypted on the first `--images` Fashion-MNIST test images (padded to
   32x32): server time (deserialize + HE + serialize), client times, bytes, key bytes, peak
   memory of this process, max logit error and top-1 agreement with the numpy forward pass,
   encrypted accuracy; per layer predicted (calibration) against measured time.
2. Trade-off between time and key size: the same plan under Galois key budgets (rotations by
   unkeyed steps composed from keyed ones), each priced by the calibrated cost model and
   measured on `--budget-images` images.
3. `--imagenet`: the full AlexNet topology (3x224x224) planned and priced (random weights; too
   slow to run here).

Writes bench/results/alexnet_bench.json and .txt (`_quick` for --quick).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from bench.results_io import RESULTS, save_results
from heinfer.errors import HeinferError
from heinfer_models import alexnet, fashion_mnist, zoo
from heinfer_models.evaluate import evaluate_encrypted
from heinfer_packing.calibrate import load_or_calibrate
from heinfer_packing.keys import apply_key_budget
from heinfer_packing.lower import lower
from heinfer_packing.report import report

MODEL = "fmnist-alexnet"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encrypted_run(model, xs, labels) -> dict:
    res = evaluate_encrypted(model, xs, progress=True)
    s = res.summary(labels[: len(xs)])
    cal = load_or_calibrate(res.plan.params)
    rep = report(res.plan, cal)
    layers = [{"layer": lr.name, "predicted_ms": lr.predicted_ms, "measured_ms": prof["ms"],
               "rotations": lr.count("rotate"), "multiply_plain": lr.count("multiply_plain")}
              for lr, prof in zip(rep.layers, res.layer_profile, strict=True)]
    s.update({
        "depth": res.plan.params.depth, "ring": res.plan.params.poly_modulus_degree,
        "rotation_keys": len(res.plan.spec().rotation_steps),
        "predicted_ms": rep.predicted_ms, "lower_bound_ms": rep.lower_bound_ms(),
        "plaintext_accuracy_same_images": float(np.mean(res.plain_predictions
                                                        == labels[: len(xs)])),
        "plaintext_accuracy_10k": model.metadata.get("plaintext_accuracy"),
        "peak_rss_mb": _peak_rss_mb(), "layers": layers,
    })
    return s


def budget_curve(model, xs, budgets: list[int], images: int) -> list[dict]:
    """Predicted and measured time against evaluation-key bytes, one row per key budget."""
    base = lower(model)
    cal = load_or_calibrate(base.params)
    rows = []
    for b in [None, *budgets]:
        try:
            plan = base if b is None else apply_key_budget(base, b, calibration=cal)
        except HeinferError as e:
            rows.append({"max_keys": b, "error": str(e)})
            continue
        rep = report(plan, cal)
        row = {"max_keys": b, "keys": len(rep.rotation_steps),
               "key_mb": rep.key_bytes() / 1e6, "predicted_ms": rep.predicted_ms,
               "rotations": sum(lr.count("rotate") for lr in rep.layers)}
        if images:
            res = evaluate_encrypted(model, xs[:images], progress=False, count_ops=False,
                                     plan=plan)
            row.update({"measured_ms": 1e3 * float(np.median(res.server_s)),
                        "max_logit_error": res.max_logit_error,
                        "measured_key_mb": res.key_bytes / 1e6})
        rows.append(row)
        print(row, flush=True)
    return rows


def imagenet_prediction() -> dict:
    model = alexnet.topology("alexnet-imagenet-224")
    t = time.perf_counter()
    plan = lower(model, compact=None)  # compaction after the pools when priced cheaper
    cal = load_or_calibrate(plan.params)
    rep = report(plan, cal)
    return {"params": plan.params.describe(), "input_layout": str(plan.input_layout),
            "compact": plan.metadata.get("compact"),
            "input_ciphertexts": plan.input_layout.n_ct, "predicted_s": rep.predicted_ms / 1e3,
            "lower_bound_s": rep.lower_bound_ms() / 1e3, "key_mb": rep.key_bytes() / 1e6,
            "upload_mb": rep.upload_bytes() / 1e6, "compile_s": time.perf_counter() - t,
            "report": rep.to_text()}


def to_text(data: dict) -> str:
    lines = []
    e = data.get("encrypted")
    if e:
        lines += [f"{MODEL}: {e['params']}, input {e['input_layout']}",
                  f"{e['images']} images: server {e['server_ms_median']:.0f} ms median "
                  f"({e['server_ms_mean']:.0f} mean), predicted {e['predicted_ms']:.0f} ms; "
                  f"keys {e['eval_key_bytes'] / 1e6:.1f} MB ({e['rotation_keys']} Galois keys); "
                  f"upload {e['upload_bytes'] / 1e3:.0f} KB, download "
                  f"{e['download_bytes'] / 1e3:.0f} KB; encrypt {e['encrypt_ms']:.0f} ms, "
                  f"decrypt {e['decrypt_ms']:.0f} ms",
                  f"agreement {e['agreement']:.2%}, max logit error {e['max_logit_error']:.3g}, "
                  f"encrypted accuracy {e['encrypted_accuracy']:.2%} (plaintext on the same "
                  f"images {e['plaintext_accuracy_same_images']:.2%}; on 10,000: "
                  f"{e['plaintext_accuracy_10k']}), peak RSS {e['peak_rss_mb']:.0f} MB",
                  "", "| layer | predicted ms | measured ms | ratio | rotations | mult_plain |",
                  "|---|---:|---:|---:|---:|---:|"]
        for lr in e["layers"]:
            ratio = (lr["measured_ms"] / lr["predicted_ms"]) if lr["predicted_ms"] else 0
            lines.append(f"| {lr['layer']} | {lr['predicted_ms']:.1f} | {lr['measured_ms']:.1f} |"
                         f" {ratio:.2f} | {lr['rotations']} | {lr['multiply_plain']} |")
    if data.get("budgets"):
        lines += ["", "| key budget | keys | key MB | rotations | predicted ms | measured ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in data["budgets"]:
            if "error" in r:
                lines.append(f"| {r['max_keys']} | - | - | - | {r['error']} | - |")
                continue
            meas = f"{r['measured_ms']:.0f}" if "measured_ms" in r else "-"
            lines.append(f"| {r['max_keys'] or 'all'} | {r['keys']} | {r['key_mb']:.0f} | "
                         f"{r['rotations']} | {r['predicted_ms']:.0f} | {meas} |")
    if data.get("imagenet"):
        i = data["imagenet"]
        lines += ["", f"alexnet-imagenet-224 (planned, not run): {i['params']}; predicted "
                  f"{i['predicted_s']:.0f} s per image (lower bound {i['lower_bound_s']:.0f} s),"
                  f" keys {i['key_mb']:.0f} MB, upload {i['upload_mb']:.0f} MB "
                  f"({i['input_ciphertexts']} ciphertexts); compaction: {i['compact']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--budgets", type=int, nargs="*", default=[16, 12, 8])
    ap.add_argument("--budget-images", type=int, default=3)
    ap.add_argument("--imagenet", action="store_true")
    ap.add_argument("--only-imagenet", action="store_true",
                    help="only re-plan the 224x224 topology and update its entry in the JSON")
    ap.add_argument("--quick", action="store_true",
                    help="1 image, budgets priced not measured, no 224x224 (for CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.budget_images, args.budgets = 1, 0, [12]
    if args.only_imagenet:
        path = RESULTS / "alexnet_bench.json"
        data = json.loads(path.read_text())
        data["imagenet"] = imagenet_prediction()
        data["imagenet_date"] = time.strftime("%Y-%m-%d %H:%M")
        path.write_text(json.dumps(data, indent=1, default=float) + "\n")
        (RESULTS / "alexnet_bench.txt").write_text(to_text(data) + "\n")
        (RESULTS / "alexnet_imagenet_224_report.txt").write_text(
            data["imagenet"]["report"] + "\n")
        print(to_text(data).splitlines()[-1])
        return 0
    model = zoo.load(MODEL)
    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: max(args.images, args.budget_images)],
                                 model.input_shape)
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": MODEL,
            "command": "python -m bench.alexnet_bench " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    data["encrypted"] = encrypted_run(model, xs[: args.images], labels)
    data["budgets"] = budget_curve(model, xs, args.budgets, args.budget_images)
    if args.imagenet:
        data["imagenet"] = imagenet_prediction()
    text = to_text(data)
    print(text)
    save_results("alexnet_bench", data, quick=args.quick)
    if not args.quick:
        (RESULTS / "alexnet_bench.txt").write_text(text + "\n")
        # the model's recorded encrypted accuracy, next to its weights (as heinfer_models.record)
        record = {k: v for k, v in data["encrypted"].items() if k != "layers"}
        record.update({"command": data["command"], "date": data["date"],
                       "test_images": f"first {args.images} of the Fashion-MNIST test set, "
                                      "padded to 32x32"})
        (zoo.model_dir(MODEL) / "encrypted_eval_im2col.json").write_text(
            json.dumps(record, indent=1, default=float) + "\n")
        if args.imagenet:
            (RESULTS / "alexnet_imagenet_224_report.txt").write_text(
                data["imagenet"]["report"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
