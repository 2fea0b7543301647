"""Train depth-K conformal (ReSPro) CNNs and polynomial CNNs of the same widths on Fashion-MNIST.

    .venv/bin/python -m heinfer_models.train_conformal --blocks 1 2 4 8 [--epochs E]
        [--train-images N] [--channels C] [--seed S] [--only conformal|polyconv]

For every K in --blocks two models are written:

* `models/zoo/fmnist-conformal-K/` (`packing.conformal.save_conformal`): K blocks of bias-free
  conv 3x3 padding 1 (1->C, then C->C) with 2x2 average pooling (stride 2) after the conv of
  blocks 2 and 4 only (28 -> 14 -> 7), each block followed by the ReSPro update
  w <- (||y||^2 + a^2 w) / (2a), a = softplus(theta) + 1e-3, starting from y = x, w = ||x||;
  then logits = Linear(y.flatten() / w) with bias. Input is `fashion_mnist.normalize(images)`;
  nothing inside the network rescales x or (y, w) (the map is not homogeneous).
* `models/zoo/fmnist-polyconv-K/` (`packing.modelfile.save_model`): K blocks of conv 3x3
  padding 1 with bias -> trained degree-2 poly (init [0, 0.5, 0.1]) -> avgpool 2x2/2 in the same
  blocks, then flatten -> dense 10 with bias. BatchNorm after each conv during training, folded
  into the conv at export; a hinge penalty keeps |values| <= 8.

All reported accuracies are computed with the numpy oracles (`ConformalNet.forward`,
`Model.forward`) on the exported float64 weights over the full 10,000-image test set. The
conformal export is checked against the torch network (float64) on 100 test images and against
`collapse(net).forward`.

torch is imported only inside the training functions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from heinfer_models import fashion_mnist
from heinfer_models.train import _fold_bn, oracle_eval, poly_act
from heinfer_packing.conformal import (
    ConformalBlock,
    ConformalNet,
    collapse,
    load_conformal,
    save_conformal,
)
from heinfer_packing.modelfile import Layer, Model, load_model, save_model

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
INPUT_SHAPE = (1, 28, 28)
POOL_BLOCKS = (2, 4)          # 1-based block indices followed by 2x2 average pooling
POLY_INIT = [0.0, 0.5, 0.1]
A_INIT = 1.0                  # initial ReSPro parameter a


def _pools(k: int) -> list[bool]:
    return [i + 1 in POOL_BLOCKS for i in range(k)]


def _out_side(k: int) -> int:
    side = INPUT_SHAPE[1]
    for p in _pools(k):
        side = side // 2 if p else side
    return side


# --------------------------------------------------------------------------------------------
# torch part
# --------------------------------------------------------------------------------------------

def _build_conformal(k: int, c: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConformalTorch(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(1 if i == 0 else c, c, 3, padding=1, bias=False) for i in range(k))
            theta0 = math.log(math.expm1(A_INIT - 1e-3))
            self.theta = nn.Parameter(torch.full((k,), theta0))
            self.pools = _pools(k)
            self.fc = nn.Linear(c * _out_side(k) ** 2, 10, bias=True)
            # The classifier weight is parametrised as fc_scale * fc.weight (exported as the
            # product): the features y/w are tiny, and a fixed scale lets Adam reach the large
            # weights they need. Set by data_init; this does not touch x or (y, w).
            self.register_buffer("fc_scale", torch.ones(()))

        @torch.no_grad()
        def data_init(self, x):
            """a_k = median over the batch of ||y_k|| / sqrt(w_{k-1}) (the a minimising w_k,
            i.e. keeping y/w as large as possible), then fc_scale = 1 / std(y/w)."""
            y = x
            w = x.flatten(1).norm(dim=1)
            for i, conv in enumerate(self.convs):
                y = conv(y)
                if self.pools[i]:
                    y = F.avg_pool2d(y, 2, 2)
                a = (y.flatten(1).norm(dim=1) / w.sqrt()).median().clamp_min(0.01)
                self.theta[i] = a - 1e-3 + torch.log(-torch.expm1(-(a - 1e-3)))  # inv softplus
                a = self.a()[i]
                w = (y.pow(2).flatten(1).sum(1) + a * a * w) / (2 * a)
            self.fc_scale.fill_(1.0 / float((y.flatten(1) / w[:, None]).std()))

        def classifier_weight(self):
            return self.fc_scale * self.fc.weight

        def a(self):
            return F.softplus(self.theta) + 1e-3

        def forward(self, x):
            y = x
            w = x.flatten(1).norm(dim=1)
            a = self.a()
            for i, conv in enumerate(self.convs):
                y = conv(y)
                if self.pools[i]:
                    y = F.avg_pool2d(y, 2, 2)
                w = (y.pow(2).flatten(1).sum(1) + a[i] * a[i] * w) / (2 * a[i])
            return F.linear(y.flatten(1) / w[:, None], self.classifier_weight(), self.fc.bias)

    return ConformalTorch()


def _build_polyconv(k: int, c: int):
    import torch.nn.functional as F
    from torch import nn

    class PolyConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(1 if i == 0 else c, c, 3, padding=1, bias=True) for i in range(k))
            self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(k))
            self.acts = nn.ModuleList(poly_act(POLY_INIT, True) for _ in range(k))
            self.pools = _pools(k)
            self.fc = nn.Linear(c * _out_side(k) ** 2, 10, bias=True)

        def forward(self, x):
            outs = []
            h = x
            for i in range(k):
                z = self.bns[i](self.convs[i](h))
                h = self.acts[i](z)
                outs += [z, h]
                if self.pools[i]:
                    h = F.avg_pool2d(h, 2, 2)
            logits = self.fc(h.flatten(1))
            return logits, outs

    return PolyConv()


def _train(net, family: str, args, x: np.ndarray, y: np.ndarray) -> float:
    import torch
    import torch.nn.functional as F

    coeff = [p for n, p in net.named_parameters() if n.endswith("coeffs")]
    other = [p for n, p in net.named_parameters() if not n.endswith("coeffs")]
    groups = [{"params": other}]
    if coeff:
        groups.append({"params": coeff, "lr": args.lr * 0.1})
    opt = torch.optim.Adam(groups, lr=args.lr)
    base = [g["lr"] for g in opt.param_groups]
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    n = len(xt)
    spe = math.ceil(n / args.batch_size)
    total = spe * args.epochs
    warm = max(1, spe // 5)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss = 0.0
        correct = 0
        for i in range(spe):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = xt[idx], yt[idx]
            f = ((step + 1) / warm if step < warm
                 else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * f
            if family == "conformal":
                logits = net(xb)
                loss = ce = F.cross_entropy(logits, yb)
            else:
                logits, outs = net(xb)
                ce = F.cross_entropy(logits, yb)
                pen = sum(F.relu(o.abs() - args.bound).pow(2).mean() for o in outs)
                loss = ce + args.penalty * pen
            if not torch.isfinite(loss):
                raise RuntimeError(f"{family}: training diverged at epoch {epoch + 1} step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            step += 1
            tot_loss += ce.item() * len(xb)
            correct += (logits.argmax(1) == yb).sum().item()
        print(f"  epoch {epoch + 1}/{args.epochs} loss {tot_loss / n:.4f} train acc "
              f"{correct / n:.4f} {time.perf_counter() - t0:.1f}s", flush=True)
    net.eval()
    return time.perf_counter() - t0


def _np(t) -> np.ndarray:
    return t.detach().double().numpy().copy()


def export_conformal(net, k: int) -> ConformalNet:
    a = _np(net.a())
    blocks = [ConformalBlock(_np(conv.weight), float(a[i]), 1, 1, 2 if p else None)
              for i, (conv, p) in enumerate(zip(net.convs, net.pools, strict=True))]
    return ConformalNet(INPUT_SHAPE, blocks, _np(net.classifier_weight()), _np(net.fc.bias))


def export_polyconv(net, k: int, name: str) -> Model:
    layers = []
    for i in range(k):
        w, b = _fold_bn(net.convs[i].weight, net.convs[i].bias, net.bns[i])
        layers.append(Layer(f"conv{i + 1}", "conv2d", {"stride": 1, "padding": 1}, w, b))
        layers.append(Layer(f"act{i + 1}", "poly",
                            {"coeffs": [float(v) for v in _np(net.acts[i].coeffs)]}))
        if net.pools[i]:
            layers.append(Layer(f"pool{i + 1}", "avgpool2d", {"kernel": 2, "stride": 2}))
    layers.append(Layer("flatten", "flatten", {}))
    layers.append(Layer("fc", "dense", {}, _np(net.fc.weight), _np(net.fc.bias)))
    return Model(name=name, input_shape=INPUT_SHAPE, layers=layers,
                 labels=list(fashion_mnist.LABELS))


def torch_logits(net, x: np.ndarray, double: bool = False) -> np.ndarray:
    import copy

    import torch

    m = copy.deepcopy(net).double() if double else net
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            xb = torch.from_numpy(x[i:i + 1000].astype(np.float64 if double else np.float32))
            r = m(xb)
            out.append((r[0] if isinstance(r, tuple) else r).double().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------

def _arch(k: int, c: int, family: str) -> str:
    parts = []
    for i, p in enumerate(_pools(k)):
        ci = 1 if i == 0 else c
        conv = (f"conv3x3 {ci}->{c} pad 1" + (" no bias" if family == "conformal" else " +bias"))
        act = "ReSPro(a)" if family == "conformal" else "poly2"
        parts.append(f"[{conv}" + (" -> avgpool2x2" if p and family == "conformal" else "")
                     + f" -> {act}" + (" -> avgpool2x2" if p and family != "conformal" else "")
                     + "]")
    side = _out_side(k)
    tail = (f"Linear({c}*{side}*{side}={c * side * side} -> 10, bias) on y/w"
            if family == "conformal" else f"flatten -> dense {c * side * side}->10 (bias)")
    return " -> ".join(parts + [tail])


def write_readme(d: Path, name: str, family: str, k: int, md: dict) -> None:
    extra = ""
    if family == "conformal":
        extra = (f"\nReSPro parameters a per block: {md['a']}.\n"
                 f"Checks: numpy `ConformalNet.forward` vs torch float64 logits on 100 test "
                 f"images: max abs diff {md['torch_vs_numpy_max_abs_diff']:.3g}; "
                 f"`collapse(net).forward` (R factor: {md['collapse_factor']}, "
                 f"{md['collapse_rank']} rows) vs `ConformalNet.forward`: max abs diff "
                 f"{md['collapse_max_abs_diff']:.3g}.\n"
                 "The input must not be rescaled: the ReSPro map is not homogeneous.\n")
    else:
        extra = ("\nBatchNorm after every conv during training, folded into the conv at export. "
                 f"Hinge penalty {md['penalty']} * mean(relu(|z| - {md['bound']})^2) on every "
                 "conv and poly output. Max |value| per layer on the 10,000 test images "
                 "(numpy oracle): " + ", ".join(f"{n} {v:.3f}" for n, v in md["max_abs"].items())
                 + ".\n")
    text = f"""# {name}

{"Conformal (ReSPro, arXiv 2110.12108)" if family == "conformal" else "Polynomial"} CNN with
{k} block(s), width {md['channels']} channels, Fashion-MNIST.

Architecture: {md['architecture']}

Input: `heinfer_models.fashion_mnist.normalize(images)`, shape (1, 28, 28). Output: 10 logits.

Plaintext test accuracy (numpy oracle, saved float64 weights, all 10,000 test images):
**{100 * md['plaintext_accuracy']:.2f}%** (torch float32: {100 * md['torch_accuracy']:.2f}%).
{extra}
## Training

{md['train_images']} training images (first N of the Fashion-MNIST train split after a seeded
shuffle), {md['epochs']} epochs, Adam lr {md['lr']} (warm-up + cosine), batch {md['batch_size']},
seed {md['seed']}, torch {md['torch_version']} with 1 thread; {md['train_seconds']:.0f} s. This is
a short, time-budgeted run, not a converged one.

```
{md['command']}
```
"""
    (d / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m heinfer_models.train_conformal",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=60000)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--penalty", type=float, default=0.1)
    p.add_argument("--bound", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["conformal", "polyconv"])
    p.add_argument("--out-dir", type=Path, default=ZOO_DIR)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    command = ".venv/bin/python -m heinfer_models.train_conformal " + shlex.join(argv)
    tr_img, tr_lab = fashion_mnist.load("train")
    te_img, te_lab = fashion_mnist.load("test")
    order = np.random.default_rng(args.seed).permutation(len(tr_img))[:args.train_images]
    x_train = fashion_mnist.normalize(tr_img[order])
    y_train = tr_lab[order].astype(np.int64)
    x_test = fashion_mnist.normalize(te_img)
    y_test = te_lab.astype(np.int64)
    assert len(x_test) == 10000
    families = [args.only] if args.only else ["conformal", "polyconv"]
    summary = []
    for k in args.blocks:
        for family in families:
            name = f"fmnist-{family}-{k}"
            torch.manual_seed(args.seed)
            net = (_build_conformal(k, args.channels) if family == "conformal"
                   else _build_polyconv(k, args.channels))
            if family == "conformal":
                net.data_init(torch.from_numpy(x_train[:512].astype(np.float32)))
            print(f"{name}: training on {len(x_train)} images, {args.epochs} epochs", flush=True)
            secs = _train(net, family, args, x_train, y_train)
            t_logits = torch_logits(net, x_test)
            torch_acc = float(np.mean(t_logits.argmax(1) == y_test))
            md = {
                "command": command, "family": family, "blocks": k, "channels": args.channels,
                "widths": [1] + [args.channels] * k, "pool_blocks": [b for b in POOL_BLOCKS
                                                                      if b <= k],
                "architecture": _arch(k, args.channels, family),
                "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
                "normalization": {"mean": fashion_mnist.MEAN, "std": fashion_mnist.STD},
                "train_images": len(x_train), "epochs": args.epochs, "seed": args.seed,
                "lr": args.lr, "batch_size": args.batch_size,
                "train_seconds": round(secs, 1), "torch_accuracy": round(torch_acc, 6),
                "torch_version": torch.__version__, "torch_threads": args.threads,
                "python": platform.python_version(),
                "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "test_images": len(x_test),
            }
            out = args.out_dir / name
            t0 = time.perf_counter()
            if family == "conformal":
                cnet = export_conformal(net, k)
                logits = np.stack([cnet.forward(xi) for xi in x_test])
                acc = float(np.mean(logits.argmax(1) == y_test))
                ref = torch_logits(net, x_test[:100], double=True)
                d_torch = float(np.max(np.abs(ref - logits[:100])))
                col = collapse(cnet)
                c_logits = np.stack([col.forward(xi) for xi in x_test[:100]])
                d_col = float(np.max(np.abs(c_logits - logits[:100])))
                if d_torch >= 1e-4:
                    raise RuntimeError(f"{name}: numpy vs torch logits differ by {d_torch}")
                md.update({"plaintext_accuracy": round(acc, 6),
                           "a": [b.a for b in cnet.blocks],
                           "torch_vs_numpy_max_abs_diff": d_torch,
                           "collapse_max_abs_diff": d_col,
                           "collapse_factor": col.factor, "collapse_rank": int(len(col.R)),
                           "collapse_c0": col.c0,
                           "logits_max_abs": float(np.max(np.abs(logits)))})
                save_conformal(cnet, out, name, list(fashion_mnist.LABELS), md)
                back, _ = load_conformal(out)
                if not np.array_equal(np.stack([back.forward(xi) for xi in x_test[:100]]),
                                      logits[:100]):
                    raise RuntimeError(f"{name}: save/load round trip changed the logits")
                extra = f"torch diff {d_torch:.2e}, collapse diff {d_col:.2e} ({col.factor})"
            else:
                model = export_polyconv(net, k, name)
                logits, max_abs = oracle_eval(model, x_test)
                acc = float(np.mean(logits.argmax(1) == y_test))
                md.update({"plaintext_accuracy": round(acc, 6),
                           "max_abs": {n: math.ceil(v * 1e6) / 1e6 for n, v in max_abs.items()},
                           "input_max_abs": math.ceil(float(np.max(np.abs(x_test))) * 1e6) / 1e6,
                           "penalty": args.penalty, "bound": args.bound,
                           "act_init": POLY_INIT, "batchnorm_folded": True})
                model.metadata = md
                save_model(model, out)
                if not np.array_equal(load_model(out).forward_batch(x_test[:100]), logits[:100]):
                    raise RuntimeError(f"{name}: save/load round trip changed the logits")
                extra = "max_abs " + ", ".join(f"{n} {v:.2f}" for n, v in max_abs.items())
            write_readme(out, name, family, k, md)
            print(f"{name}: numpy accuracy {acc:.4f} (torch {torch_acc:.4f}), train {secs:.1f}s, "
                  f"eval {time.perf_counter() - t0:.1f}s; {extra}; saved {out}", flush=True)
            summary.append((name, acc, secs))
    print("\nsummary:")
    for name, acc, secs in summary:
        print(f"  {name:22s} accuracy {acc:.4f}  train {secs:6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
