"""Accuracy vs activation degree: a small CryptoNets-like CNN trained with ReLU, its ReLUs
replaced by least-squares polynomials of degree 2..8, plaintext accuracy on the 10,000 test
images for each degree, and encrypted inference for the low degrees.

    .venv/bin/python -m bench.degree_bench [--quick] [--epochs 5] [--degrees 2 3 4 5 6 7 8]
        [--encrypted-degrees 2 3 4] [--images 20] [--calib 512]

The network: conv 5x5 stride 2 padding 1 (5 channels) -> BatchNorm -> ReLU -> dense 845->100
-> BatchNorm -> ReLU -> dense 100->10 (the shape of models/zoo/fmnist-cryptonets), trained with
the project's helpers (`heinfer_models.train_conformal._train`: Adam, warm-up + cosine, a hinge
penalty keeping pre-activations within +-8); BatchNorm folded at export (`_fold_bn`). Each ReLU
becomes the polynomial of the chosen degree fitted by the compiler's own pass
(`heinfer_packing.rewrites.fit_activations`) on the values it sees on `--calib` training images.
Plaintext accuracy: numpy oracle (`oracle_eval`, float64). Encrypted: `evaluate_encrypted` with
the default (128-bit, last layer without rescale) plan on the first `--images` test images: top-1
agreement with the plaintext oracle of the same polynomial model and max logit error.

Writes bench/results/degree_bench.json and .txt, docs/img/accuracy_vs_degree.png
(`bench.plots.accuracy_vs_degree`) and the trained ReLU model to bench/results/fmnist-relu-small/
(not models/zoo/: the zoo holds models that lower without calibration data; see
docs/BENCHMARKS.md). `--quick` (CI, under a minute): 2,000 training images for one epoch, 1,000
test images, degrees 2 and 3, 2 encrypted images; writes degree_bench_quick.json only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.results_io import RESULTS, save_results
from heinfer_models import fashion_mnist
from heinfer_models.train import oracle_eval
from heinfer_packing.lower import fold_model, plan_depth
from heinfer_packing.modelfile import Layer, Model, load_model, save_model
from heinfer_packing.rewrites import fit_activations

MODEL_NAME = "fmnist-relu-small"
MODEL_DIR = RESULTS / MODEL_NAME
INPUT_SHAPE = (1, 28, 28)
CONV = {"out_channels": 5, "kernel": 5, "stride": 2, "padding": 1}
HIDDEN = 100


# -- torch part (imported only here) ------------------------------------------------------------
def build_net():
    import torch
    from torch import nn

    class ReluNet(nn.Module):
        def __init__(self):
            super().__init__()
            c = CONV
            self.conv1 = nn.Conv2d(1, c["out_channels"], c["kernel"], stride=c["stride"],
                                   padding=c["padding"])
            side = (INPUT_SHAPE[1] + 2 * c["padding"] - c["kernel"]) // c["stride"] + 1
            self.bn1 = nn.BatchNorm2d(c["out_channels"])
            self.fc1 = nn.Linear(c["out_channels"] * side * side, HIDDEN)
            self.bn2 = nn.BatchNorm1d(HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, 10)

        def forward(self, x):
            """Logits and the pre-activations (kept within the hinge bound by `_train`)."""
            z1 = self.bn1(self.conv1(x))
            z2 = self.bn2(self.fc1(torch.relu(z1).flatten(1)))
            return self.fc2(torch.relu(z2)), [z1, z2]

    return ReluNet()


def export(net) -> Model:
    from heinfer_models.train import _fold_bn

    w1, b1 = _fold_bn(net.conv1.weight, net.conv1.bias, net.bn1)
    w2, b2 = _fold_bn(net.fc1.weight, net.fc1.bias, net.bn2)
    w3 = net.fc2.weight.detach().double().numpy()
    b3 = net.fc2.bias.detach().double().numpy()
    return Model(MODEL_NAME, INPUT_SHAPE, [
        Layer("conv1", "conv2d", {"stride": CONV["stride"], "padding": CONV["padding"]}, w1, b1),
        Layer("act1", "activation", {"fn": "relu"}),
        Layer("flatten", "flatten", {}),
        Layer("fc1", "dense", {}, w2, b2),
        Layer("act2", "activation", {"fn": "relu"}),
        Layer("fc2", "dense", {}, w3, b3),
    ], labels=list(fashion_mnist.LABELS))


def train_relu(args, x: np.ndarray, y: np.ndarray):
    import torch

    from heinfer_models.train_conformal import _train

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = build_net()
    secs = _train(net, "relu", args, x, y)
    return net, secs


def torch_accuracy(net, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    preds = []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            logits, _ = net(torch.from_numpy(x[i:i + 1000].astype(np.float32)))
            preds.append(logits.argmax(1).numpy())
    return float(np.mean(np.concatenate(preds) == y))


# -- numpy / HE part ----------------------------------------------------------------------------
def _ceil6(v: float) -> float:
    return math.ceil(v * 1e6) / 1e6


def plaintext_row(model: Model, x: np.ndarray, y: np.ndarray,
                  relu_preds: np.ndarray | None) -> tuple[dict, np.ndarray]:
    logits, max_abs = oracle_eval(model, x)
    preds = logits.argmax(1)
    model.metadata["max_abs"] = {k: _ceil6(v) for k, v in max_abs.items()}
    row = {"accuracy": float(np.mean(preds == y)), "test_images": len(x),
           "max_abs_logit": float(max_abs[model.layers[-1].name])}
    if relu_preds is not None:
        row["agreement_with_relu"] = float(np.mean(preds == relu_preds))
    return row, preds


def degree_row(relu: Model, degree: int, calib_x: np.ndarray, x: np.ndarray, y: np.ndarray,
               relu_preds: np.ndarray) -> tuple[dict, Model]:
    from heinfer_packing.lower import lower

    t = time.perf_counter()
    model, changes, _ = fit_activations(relu, calib_x, degree)
    model.name = f"{MODEL_NAME}-poly{degree}"
    row, _ = plaintext_row(model, x, y, relu_preds)
    acts = [layer for layer in model.layers if layer.op == "poly"]
    plan = lower(model)  # the plan evaluate_encrypted runs: 128-bit, last layer unrescaled
    row.update({
        "degree": degree,
        "fits": {a.name: {"range": a.attrs["range"], "coeffs": a.attrs["coeffs"]} for a in acts},
        "steps": [s.op for s in fold_model(model)[0]],
        "he_depth": plan_depth(plan.steps),
        "ring": plan.params.poly_modulus_degree,
        "params": plan.params.describe(),
        "seconds": time.perf_counter() - t,
    })
    print(f"degree {degree}: accuracy {row['accuracy']:.4f} (agreement with ReLU "
          f"{row['agreement_with_relu']:.4f}), HE depth {row['he_depth']}, n={row['ring']}; "
          + "; ".join(changes), flush=True)
    return row, model


def encrypted_figures(model: Model, xs: np.ndarray, labels: np.ndarray) -> dict:
    from heinfer_models.evaluate import evaluate_encrypted

    res = evaluate_encrypted(model, xs, progress=False, count_ops=False)
    s = res.summary(labels)
    return {"images": s["images"], "agreement": s["agreement"],
            "max_logit_error": s["max_logit_error"],
            "encrypted_accuracy": s["encrypted_accuracy"],
            "server_ms_median": s["server_ms_median"], "params": s["params"],
            "eval_key_bytes": s["eval_key_bytes"], "keygen_s": s["keygen_s"]}


def table(data: dict) -> str:
    relu = data["relu"]
    n_test = relu["test_images"]
    lines = [f"# bench/results/degree_bench.json ({data['date']}); command: {data['command']}",
             f"# ReLU network: plaintext accuracy {100 * relu['accuracy']:.2f}% on {n_test:,} "
             + (f"test images (torch float32 {100 * data['train']['torch_accuracy']:.2f}%), "
                f"trained {data['train']['epochs']} epochs in {data['train']['seconds']:.0f} s"
                if data["train"]["torch_accuracy"] is not None
                else f"test images (saved model {data['train']['relu_model']})"),
             f"| degree | plaintext acc. ({n_test:,}) | agreement with ReLU | HE depth | ring n "
             "| encrypted images | top-1 agreement (HE vs plain) | max logit error "
             "| server ms / image |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        e = r.get("encrypted")
        enc = (f"{e['images']} | {100 * e['agreement']:.1f}% | {e['max_logit_error']:.1e} | "
               f"{e['server_ms_median']:.0f}" if e else "- | - | - | -")
        lines.append(f"| {r['degree']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['agreement_with_relu']:.2f}% | {r['he_depth']} | {r['ring']} | "
                     f"{enc} |")
    lines.append(f"| ReLU | {100 * relu['accuracy']:.2f}% | 100% | - | - | - | - | - | - |")
    return "\n".join(lines)


def write_readme(model: Model, data: dict) -> None:
    tr, relu = data["train"], data["relu"]
    rows = "\n".join(f"| {r['degree']} | {100 * r['accuracy']:.2f}% | {r['he_depth']} |"
                     for r in data["rows"])
    text = f"""# {MODEL_NAME}

Small CryptoNets-like CNN with **ReLU** activations, trained for `bench/degree_bench.py`
(accuracy vs activation degree, docs/BENCHMARKS.md).

Architecture (model format, BatchNorm folded): conv2d 1->5 5x5 stride 2 padding 1 (+bias) ->
activation relu -> flatten (845) -> dense 845->{HIDDEN} (+bias) -> activation relu ->
dense {HIDDEN}->10 (+bias). Input: `heinfer_models.fashion_mnist.normalize(images)`, shape
(1, 28, 28). Output: 10 logits.

Plaintext test accuracy (numpy oracle, float64, all {relu['test_images']:,} test images):
**{100 * relu['accuracy']:.2f}%** (torch float32: {100 * tr['torch_accuracy']:.2f}%).

Not HE-ready as saved: the ReLUs must be replaced by polynomials first, e.g.
`heinfer-compile bench/results/{MODEL_NAME} --calib-fmnist 512 --degree 3` (the compiler's
`fit_activations`). That is why it lives here and not in models/zoo/ (every zoo model lowers
without calibration data, and the tests lower every zoo model). Accuracy after the replacement:

| degree | plaintext accuracy | HE depth |
|---:|---:|---:|
{rows}

## Training

{tr['train_images']} training images, {tr['epochs']} epochs, Adam lr {tr['lr']} (warm-up +
cosine), batch {tr['batch_size']}, hinge penalty {tr['penalty']} * mean(relu(|z| - {tr['bound']})^2)
on both pre-activations, seed {tr['seed']}, torch {tr['torch_version']} with {tr['threads']}
thread(s); {tr['seconds']:.0f} s. A short, time-budgeted run, not a converged one.

```
{data['command']}
```
"""
    (MODEL_DIR / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run for CI (under a minute)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-images", type=int, default=60000)
    ap.add_argument("--degrees", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--encrypted-degrees", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--images", type=int, default=20, help="encrypted test images per degree")
    ap.add_argument("--calib", type=int, default=512, help="training images to fit on")
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--penalty", type=float, default=0.1)
    ap.add_argument("--bound", type=float, default=8.0)
    ap.add_argument("--relu-model", type=Path, metavar="DIR",
                    help="use this trained ReLU model (e.g. bench/results/fmnist-relu-small) "
                         "instead of training one: no torch needed")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.train_images, args.test_images = 1, 2000, 1000
        args.degrees, args.encrypted_degrees, args.images, args.calib = [2, 3], [2, 3], 2, 256
    command = " ".join([".venv/bin/python -m bench.degree_bench", shlex.join(argv)]).rstrip()
    t_start = time.perf_counter()

    tr_img, tr_lab = fashion_mnist.load("train")
    te_img, te_lab = fashion_mnist.load("test")
    order = np.random.default_rng(args.seed).permutation(len(tr_img))
    x_train = fashion_mnist.normalize(tr_img[order[:args.train_images]])
    y_train = tr_lab[order[:args.train_images]].astype(np.int64)
    # calibration: training images (never test images), the first of the same permutation
    calib_x = fashion_mnist.normalize(tr_img[order[:args.calib]])
    x_test = fashion_mnist.normalize(te_img[:args.test_images])
    y_test = te_lab[:args.test_images].astype(np.int64)

    if args.relu_model:
        relu = load_model(args.relu_model)
        t_acc, train_s, torch_version = None, 0.0, None
        relu_row, relu_preds = plaintext_row(relu, x_test, y_test, None)
        print(f"ReLU model {args.relu_model}: numpy accuracy {relu_row['accuracy']:.4f}",
              flush=True)
    else:
        import torch

        print(f"training {MODEL_NAME} (ReLU) on {len(x_train)} images, {args.epochs} "
              f"epoch(s), {args.threads} thread(s)", flush=True)
        net, train_s = train_relu(args, x_train, y_train)
        t_acc, torch_version = torch_accuracy(net, x_test, y_test), torch.__version__
        relu = export(net)
        relu_row, relu_preds = plaintext_row(relu, x_test, y_test, None)
        print(f"ReLU: numpy accuracy {relu_row['accuracy']:.4f} (torch {t_acc:.4f}), trained "
              f"in {train_s:.0f} s", flush=True)

    rows, models = [], {}
    for d in args.degrees:
        row, models[d] = degree_row(relu, d, calib_x, x_test, y_test, relu_preds)
        rows.append(row)
    for d in args.encrypted_degrees:
        if d not in models:
            row, models[d] = degree_row(relu, d, calib_x, x_test, y_test, relu_preds)
            rows.append(row)
        row = next(r for r in rows if r["degree"] == d)
        row["encrypted"] = encrypted_figures(models[d], x_test[:args.images],
                                             y_test[:args.images])
        e = row["encrypted"]
        print(f"degree {d} encrypted on {e['images']} images: agreement "
              f"{e['agreement']:.0%}, max logit error {e['max_logit_error']:.2e}, "
              f"{e['server_ms_median']:.0f} ms/image ({e['params']})", flush=True)
    rows.sort(key=lambda r: r["degree"])

    data = {
        "date": time.strftime("%Y-%m-%d"), "command": command, "cores": os.cpu_count(),
        "python": platform.python_version(), "quick": args.quick,
        "train": {"train_images": len(x_train), "epochs": args.epochs, "seed": args.seed,
                  "lr": args.lr, "batch_size": args.batch_size, "penalty": args.penalty,
                  "bound": args.bound, "threads": args.threads, "seconds": train_s,
                  "torch_accuracy": t_acc, "torch_version": torch_version,
                  "relu_model": str(args.relu_model) if args.relu_model else None},
        "calibration_images": len(calib_x),
        "relu": relu_row,
        "rows": rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    save_results("degree_bench", data, quick=args.quick)
    text = table(data)
    print("\n" + text)
    if not args.quick and not args.relu_model:
        (RESULTS / "degree_bench.txt").write_text(text + "\n")
        relu.metadata = {
            "command": command, "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
            "normalization": {"mean": fashion_mnist.MEAN, "std": fashion_mnist.STD},
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "plaintext_accuracy": round(relu_row["accuracy"], 6),
            "test_images": relu_row["test_images"], "torch_accuracy": round(t_acc, 6),
            "max_abs": relu.metadata["max_abs"], "train": data["train"],
        }
        save_model(relu, MODEL_DIR)
        write_readme(relu, data)
        print(f"wrote {MODEL_DIR}")
        from bench.plots import accuracy_vs_degree

        print(f"wrote {accuracy_vs_degree()}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    ok = all(math.isfinite(r["accuracy"]) for r in rows) and all(
        math.isfinite(r["encrypted"]["max_logit_error"]) for r in rows if "encrypted" in r)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
