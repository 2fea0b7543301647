"""Train the zoo models on Fashion-MNIST and save them in the project's model format.

    .venv/bin/python -m heinfer_models.train fmnist-cryptonets [--epochs E] [--out DIR]
    .venv/bin/python -m heinfer_models.train fmnist-tenseal-tutorial [--epochs E] [--out DIR]

torch is only needed here (the optional extra `train`); the rest of heinfer never imports it.

Every zoo model is a chain conv2d -> poly -> flatten -> dense -> poly -> dense. During training a
BatchNorm follows the conv and the first dense layer; at export it is folded into their weights
(eval-mode BatchNorm is a per-channel affine map), so the saved model has exactly the layers above.

Encrypted inference (CKKS) has only a few bits of headroom above the scale, so training adds a
hinge penalty on every intermediate value whose magnitude exceeds `--bound`; after export the
maximum |value| at the output of each layer is measured with the numpy oracle
(`Model.forward`) on the full 10,000-image test set and, if the logits still exceed
`--logit-limit`, the last dense layer is divided by a constant (arg-max is unchanged). All
reported numbers (accuracy, max_abs) are computed with the numpy oracle on the weights that are
saved, and the saved copy is re-loaded and checked to produce identical logits.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from heinfer.reference import forward_layer
from heinfer_models import fashion_mnist
from heinfer_packing.modelfile import Layer, Model, load_model, save_model

ZOO_DIR = Path(__file__).resolve().parent / "zoo"

# Architectures (model-format layer names). `act` is "trained" (degree-2 coefficients learned per
# activation layer, initialised to `init`) or a fixed coefficient list.
SPECS: dict[str, dict[str, Any]] = {
    "fmnist-cryptonets": {
        "description": "CryptoNets-style CNN: conv 5x5/2 (5 ch) -> trained quadratic -> "
                       "dense 845->100 -> trained quadratic -> dense 100->10",
        "conv": {"out_channels": 5, "kernel": 5, "stride": 2, "padding": 1},
        "hidden": 100,
        "act": "trained",
        "init": [0.0, 0.5, 0.1],
        # Chosen on a 10,000-image hold-out of the training set (--holdout 10000), not on test.
        "train": {"epochs": 30, "flip": True, "label_smoothing": 0.1, "dropout": 0.2,
                  "weight_decay": 1e-4},
    },
    "fmnist-tenseal-tutorial": {
        "description": "TenSEAL tutorial-4 network: conv 7x7/3 (4 ch) -> x^2 -> "
                       "dense 256->64 -> x^2 -> dense 64->10",
        "conv": {"out_channels": 4, "kernel": 7, "stride": 3, "padding": 0},
        "hidden": 64,
        "act": [0.0, 0.0, 1.0],
        # This smaller net underfits: dropout / weight decay cost accuracy on the hold-out.
        "train": {"epochs": 30, "flip": True, "label_smoothing": 0.1, "dropout": 0.0,
                  "weight_decay": 0.0},
    },
}

# Training defaults; a model's "train" entry overrides them and command-line options override both.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 30, "seed": 0, "batch_size": 128, "lr": 3e-3, "coeff_lr_scale": 0.1,
    "weight_decay": 0.0, "clip": 5.0, "penalty": 0.1, "bound": 8.0, "logit_bound": 12.0,
    "logit_limit": 20.0, "flip": False, "label_smoothing": 0.0, "dropout": 0.0,
}

INPUT_SHAPE = (1, 28, 28)
TEST_IMAGES = 10_000


# --------------------------------------------------------------------------------------------
# torch part
# --------------------------------------------------------------------------------------------

def poly_act(coeffs: list[float], trainable: bool):
    """A torch module c0 + c1 x + c2 x^2, coefficients learned or fixed (shared by the training
    scripts; torch is imported here, never at module import)."""
    import torch
    from torch import nn

    class PolyAct(nn.Module):
        def __init__(self):
            super().__init__()
            t = torch.tensor(coeffs, dtype=torch.float32)
            if trainable:
                self.coeffs = nn.Parameter(t)
            else:
                self.register_buffer("coeffs", t)

        def forward(self, x):
            c = self.coeffs
            return c[0] + c[1] * x + c[2] * x * x

    return PolyAct()


def _build_torch_net(spec: dict[str, Any], batchnorm: bool, dropout: float = 0.0):
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            cs = spec["conv"]
            self.dropout = nn.Dropout(dropout) if dropout > 0 else None
            self.conv1 = nn.Conv2d(1, cs["out_channels"], cs["kernel"], stride=cs["stride"],
                                   padding=cs["padding"], bias=True)
            side = (INPUT_SHAPE[1] + 2 * cs["padding"] - cs["kernel"]) // cs["stride"] + 1
            self.conv_out_shape = (cs["out_channels"], side, side)
            n_flat = cs["out_channels"] * side * side
            self.bn1 = nn.BatchNorm2d(cs["out_channels"]) if batchnorm else None
            trained = spec["act"] == "trained"
            coeffs = spec["init"] if trained else spec["act"]
            self.act1 = poly_act(coeffs, trained)
            self.fc1 = nn.Linear(n_flat, spec["hidden"], bias=True)
            self.bn2 = nn.BatchNorm1d(spec["hidden"]) if batchnorm else None
            self.act2 = poly_act(coeffs, trained)
            self.fc2 = nn.Linear(spec["hidden"], 10, bias=True)

        def forward(self, x):
            """Return logits and the list of every layer output (for the magnitude penalty)."""
            z1 = self.conv1(x)
            if self.bn1 is not None:
                z1 = self.bn1(z1)
            a1 = self.act1(z1)
            f = a1.flatten(1)  # (N, C*H*W): same order as numpy reshape(-1) of (C, H, W)
            if self.dropout is not None:  # training only (identity in eval mode)
                f = self.dropout(f)
            z2 = self.fc1(f)
            if self.bn2 is not None:
                z2 = self.bn2(z2)
            a2 = self.act2(z2)
            logits = self.fc2(a2)
            return logits, [z1, a1, z2, a2, logits]

    return Net()


def _fold_bn(weight, bias, bn):
    """Fold an eval-mode BatchNorm that follows a conv/dense layer into its weight and bias."""
    w = weight.detach().double().numpy()
    b = bias.detach().double().numpy()
    if bn is None:
        return w, b
    gamma = bn.weight.detach().double().numpy()
    beta = bn.bias.detach().double().numpy()
    mean = bn.running_mean.detach().double().numpy()
    var = bn.running_var.detach().double().numpy()
    s = gamma / np.sqrt(var + bn.eps)
    w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    b = (b - mean) * s + beta
    return w, b


def _export(net, spec: dict[str, Any], name: str) -> Model:
    w1, b1 = _fold_bn(net.conv1.weight, net.conv1.bias, net.bn1)
    w2, b2 = _fold_bn(net.fc1.weight, net.fc1.bias, net.bn2)
    w3 = net.fc2.weight.detach().double().numpy()
    b3 = net.fc2.bias.detach().double().numpy()
    c1 = [float(c) for c in net.act1.coeffs.detach().double().numpy()]
    c2 = [float(c) for c in net.act2.coeffs.detach().double().numpy()]
    cs = spec["conv"]
    layers = [
        Layer("conv1", "conv2d", {"stride": cs["stride"], "padding": cs["padding"]}, w1, b1),
        Layer("act1", "poly", {"coeffs": c1}),
        Layer("flatten", "flatten", {}),
        Layer("fc1", "dense", {}, w2, b2),
        Layer("act2", "poly", {"coeffs": c2}),
        Layer("fc2", "dense", {}, w3, b3),
    ]
    return Model(name=name, input_shape=INPUT_SHAPE, layers=layers,
                 labels=list(fashion_mnist.LABELS))


def train_torch(spec: dict[str, Any], args, x_train: np.ndarray, y_train: np.ndarray):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    net = _build_torch_net(spec, batchnorm=not args.no_batchnorm, dropout=args.dropout)

    coeff_params = [p for n, p in net.named_parameters() if n.endswith("coeffs")]
    other_params = [p for n, p in net.named_parameters() if not n.endswith("coeffs")]
    groups = [{"params": other_params, "weight_decay": args.weight_decay}]
    if coeff_params:
        # The activation coefficients are few and very influential: a smaller learning rate and
        # no weight decay keep the quadratic from running away early in training.
        groups.append({"params": coeff_params, "lr": args.lr * args.coeff_lr_scale,
                       "weight_decay": 0.0})
    opt = torch.optim.Adam(groups, lr=args.lr)

    xt = torch.from_numpy(x_train.astype(np.float32))
    yt = torch.from_numpy(y_train.astype(np.int64))
    n = len(xt)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch // 2
    base_lrs = [g["lr"] for g in opt.param_groups]

    def lr_factor(step: int) -> float:  # short linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        run_loss = run_pen = 0.0
        correct = 0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = xt[idx], yt[idx]
            if args.flip:
                flip = torch.rand(len(xb), generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * lr_factor(step)
            logits, outs = net(xb)
            ce = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            pen = sum(F.relu(o.abs() - args.bound).pow(2).mean() for o in outs[:-1])
            pen = pen + F.relu(logits.abs() - args.logit_bound).pow(2).mean()
            loss = ce + args.penalty * pen
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch + 1}, step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
            opt.step()
            step += 1
            run_loss += ce.item() * len(xb)
            run_pen += pen.item() * len(xb)
            correct += (logits.argmax(1) == yb).sum().item()
        coeffs = ""
        if coeff_params:
            coeffs = "  act1 " + _fmt(net.act1.coeffs) + "  act2 " + _fmt(net.act2.coeffs)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {run_loss / n:.4f}  pen "
              f"{run_pen / n:.4f}  train acc {correct / n:.4f}  "
              f"{time.perf_counter() - t0:6.1f}s{coeffs}", flush=True)
    train_seconds = time.perf_counter() - t0
    net.eval()
    return net, train_seconds


def _fmt(t) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in t.detach().tolist()) + "]"


def torch_predict(net, x: np.ndarray) -> np.ndarray:
    import torch

    preds = []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            logits, _ = net(torch.from_numpy(x[i:i + 1000].astype(np.float32)))
            preds.append(logits.argmax(1).numpy())
    return np.concatenate(preds)


# --------------------------------------------------------------------------------------------
# numpy-oracle part (no torch)
# --------------------------------------------------------------------------------------------

def oracle_eval(model: Model, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Run the numpy oracle layer by layer on every image.

    Returns the logits (N, 10) and the max |value| at the output of each layer (by layer name).
    """
    max_abs = {layer.name: 0.0 for layer in model.layers}
    logits = []
    for xi in x:
        h = xi
        for layer in model.layers:
            h = forward_layer(layer, h)
            max_abs[layer.name] = max(max_abs[layer.name], float(np.max(np.abs(h))))
        logits.append(h)
    return np.stack(logits), max_abs


def _ceil6(v: float) -> float:
    return math.ceil(v * 1e6) / 1e6


def rescale_last_layer(model: Model, factor: float) -> None:
    last = model.layers[-1]
    assert last.op == "dense"
    last.weight = last.weight / factor
    if last.bias is not None:
        last.bias = last.bias / factor


# --------------------------------------------------------------------------------------------

def write_readme(directory: Path, model: Model, spec: dict[str, Any]) -> None:
    md = model.metadata
    hp = md["hparams"]
    rows = []
    shape: tuple[int, ...] = model.input_shape
    for layer in model.layers:
        if layer.op == "conv2d":
            co, ci, kh, kw = layer.weight.shape
            s, p = layer.attrs["stride"], layer.attrs["padding"]
            side = (shape[1] + 2 * p - kh) // s + 1
            shape = (co, side, side)
            what = f"{ci}->{co} channels, {kh}x{kw} kernel, stride {s}, padding {p}, bias"
        elif layer.op == "poly":
            c = layer.attrs["coeffs"]
            what = "coeffs [" + ", ".join(f"{v:.6g}" for v in c) + "]" + (
                " (trained)" if spec["act"] == "trained" else " (x*x, fixed)")
        elif layer.op == "flatten":
            shape = (int(np.prod(shape)),)
            what = "numpy reshape(-1) of (C, H, W)"
        elif layer.op == "dense":
            shape = (layer.weight.shape[0],)
            what = f"{layer.weight.shape[1]}->{layer.weight.shape[0]}, bias"
        else:
            what = ""
        shp = "x".join(str(d) for d in shape)
        rows.append(f"| `{layer.name}` | {layer.op} | {what} | {shp} | "
                    f"{md['max_abs'][layer.name]:.3f} |")
    text = f"""# {model.name}

{spec['description']}.

Input: one Fashion-MNIST image, shape (1, 28, 28), normalised as
`(pixel/255 - {fashion_mnist.MEAN}) / {fashion_mnist.STD}`
(`heinfer_models.fashion_mnist.normalize`).
Output: 10 logits, labels `{', '.join(model.labels)}`.

| layer | op | details | output shape | max abs value on test set |
|---|---|---|---|---|
{chr(10).join(rows)}

Max |input| = {md['input_max_abs']:.3f}. The max-abs column is measured with the numpy oracle
(`Model.forward`) on all {md['test_images']} test images.

## Accuracy

Plaintext test accuracy (numpy oracle, saved weights, full {md['test_images']}-image test set):
**{100 * md['plaintext_accuracy']:.2f}%** (torch, float32, before export:
{100 * md['torch_accuracy']:.2f}%).

## Reproduce

```
{md['command']}
```

(from the repository root; torch=={md['torch_version']}, {md['torch_threads']} threads, seed
{md['seed']}, {md['epochs']} epochs, Adam lr {md['hparams']['lr']}, batch
{md['hparams']['batch_size']}; training took {md['train_seconds']:.0f} s on the machine that
produced these weights). Results can differ in the last digits on other CPUs / thread counts.

Training notes: BatchNorm after `conv1` and `fc1` is used during training only and folded into
their weights at export. A hinge penalty `{md['hparams']['penalty']} * mean(relu(|z| - B)^2)`
(B = {md['hparams']['bound']} for hidden layers, {md['hparams']['logit_bound']} for the logits)
keeps every value small for CKKS. Regularisation: random horizontal flips {hp['flip']},
label smoothing {hp['label_smoothing']}, dropout {hp['dropout']} on the flattened features,
weight decay {hp['weight_decay']}. Logit rescale applied to `fc2` after training:
{md['fc2_rescale']} (1.0 = none; otherwise weights and bias divided by it, arg-max unchanged).
All hyper-parameters are in `model.json` under `metadata.hparams`.
"""
    (directory / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m heinfer_models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(SPECS))
    p.add_argument("--epochs", type=int, help="default: per model (30)")
    p.add_argument("--out", type=Path, default=None, help="default: models/zoo/NAME")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate (peak of the schedule)")
    p.add_argument("--coeff-lr-scale", type=float, help="lr factor for poly coefficients")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip", type=float, help="gradient-norm clip")
    p.add_argument("--penalty", type=float, help="weight of the magnitude penalty")
    p.add_argument("--bound", type=float, help="hinge bound, hidden layers")
    p.add_argument("--logit-bound", type=float, help="hinge bound, logits")
    p.add_argument("--logit-limit", type=float,
                   help="after training, divide fc2 so that max |logit| on the test set <= this")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--dropout", type=float, help="dropout on the flattened features")
    p.add_argument("--no-batchnorm", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--holdout", type=int, default=0,
                   help="tuning only: train on train[:-N], report accuracy on train[-N:]; "
                        "nothing is saved unless --out is given")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    spec = SPECS[args.name]
    for key, value in {**TRAIN_DEFAULTS, **spec["train"]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    command = ".venv/bin/python -m heinfer_models.train " + shlex.join(argv)

    train_imgs, train_labels = fashion_mnist.load("train")
    test_imgs, test_labels = fashion_mnist.load("test")
    x_train = fashion_mnist.normalize(train_imgs)
    y_train = train_labels.astype(np.int64)
    x_test = fashion_mnist.normalize(test_imgs)
    y_test = test_labels.astype(np.int64)
    if args.holdout:
        x_test, y_test = x_train[-args.holdout:], y_train[-args.holdout:]
        x_train, y_train = x_train[:-args.holdout], y_train[:-args.holdout]
    else:
        assert len(x_test) == TEST_IMAGES

    print(f"training {args.name} on {len(x_train)} images, {args.epochs} epochs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    net, train_seconds = train_torch(spec, args, x_train, y_train)
    torch_acc = float(np.mean(torch_predict(net, x_test) == y_test))
    print(f"torch accuracy: {torch_acc:.4f}  (trained in {train_seconds:.1f}s)", flush=True)

    model = _export(net, spec, args.name)
    t0 = time.perf_counter()
    logits, max_abs = oracle_eval(model, x_test)
    rescale = 1.0
    max_logit = max_abs["fc2"]
    if max_logit > args.logit_limit:
        rescale = float(math.ceil(max_logit / args.logit_limit * 100) / 100)  # 2 decimals
        print(f"max |logit| {max_logit:.2f} > {args.logit_limit}: dividing fc2 by {rescale}")
        rescale_last_layer(model, rescale)
        logits, max_abs = oracle_eval(model, x_test)
    preds = logits.argmax(1)
    acc = float(np.mean(preds == y_test))
    print(f"numpy-oracle accuracy: {acc:.4f}  ({time.perf_counter() - t0:.1f}s)")
    print("max |value| per layer: " + json.dumps({k: round(v, 3) for k, v in max_abs.items()}))
    agree = float(np.mean(torch_predict(net, x_test) == preds))
    print(f"torch / oracle prediction agreement: {agree:.4f}")
    if abs(acc - torch_acc) > 0.001:
        print(f"WARNING: oracle accuracy {acc:.4f} differs from torch {torch_acc:.4f} by > 0.1%",
              file=sys.stderr)

    if args.holdout and args.out is None:
        return 0

    model.metadata = {
        "command": command,
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "normalization": {"mean": fashion_mnist.MEAN, "std": fashion_mnist.STD},
        "train_images": len(x_train),
        "epochs": args.epochs,
        "seed": args.seed,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plaintext_accuracy": round(acc, 6),
        "test_images": len(x_test) if not args.holdout else f"holdout {len(x_test)}",
        "torch_accuracy": round(torch_acc, 6),
        # rounded *up* to 6 decimals so the stored numbers stay upper bounds
        "max_abs": {k: _ceil6(v) for k, v in max_abs.items()},
        "input_max_abs": _ceil6(float(np.max(np.abs(x_test)))),
        "fc2_rescale": rescale,
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "hparams": {
            "optimizer": "Adam", "lr": args.lr, "schedule": "warmup 0.5 epoch + cosine",
            "batch_size": args.batch_size, "coeff_lr_scale": args.coeff_lr_scale,
            "weight_decay": args.weight_decay, "grad_clip": args.clip,
            "penalty": args.penalty, "bound": args.bound, "logit_bound": args.logit_bound,
            "logit_limit": args.logit_limit, "flip": args.flip,
            "label_smoothing": args.label_smoothing, "dropout": args.dropout,
            "batchnorm_folded": not args.no_batchnorm,
            "act_init": spec.get("init") if spec["act"] == "trained" else None,
        },
    }
    out = args.out if args.out is not None else ZOO_DIR / args.name
    save_model(model, out)
    write_readme(out, model, spec)

    # Round trip: the saved copy must give exactly the same logits.
    loaded = load_model(out)
    re_logits = loaded.forward_batch(x_test)
    if not np.array_equal(re_logits, logits):
        raise RuntimeError("round trip through save_model/load_model changed the logits")
    print(f"saved {out} (round trip OK)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
