"""Train the AlexNet-style zoo model `fmnist-alexnet` on Fashion-MNIST padded to 1x32x32.

    .venv/bin/python -m heinfer_models.train_alexnet [--epochs E] [--threads T] [--out DIR]

Architecture (`heinfer_models.alexnet.FMNIST_32`): five convolutions 16-32-32-64-64 (conv1 11x11
stride 4, then 3x3), each followed by a BatchNorm (training only, folded at export) and a trained
degree-2 polynomial activation, 2x2 average pools after conv2 and conv5, then dense
256-128-64-10 with trained degree-2 activations between. The same magnitude penalty as the other
zoo models keeps every intermediate value within `--bound` so CKKS headroom is predictable.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

from heinfer_models import fashion_mnist
from heinfer_models.alexnet import FMNIST_32, AlexNetConfig, build
from heinfer_models.train import _fold_bn, oracle_eval, poly_act
from heinfer_models.train_conformal import _train
from heinfer_packing.modelfile import load_model, save_model

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
NAME = "fmnist-alexnet"
POLY_INIT = [0.0, 0.5, 0.1]


def _build_torch(config: AlexNetConfig, bound: float = 8.0, logit_bound: float = 16.0):
    import torch.nn.functional as F
    from torch import nn

    class AlexNetTorch(nn.Module):
        def __init__(self):
            super().__init__()
            c = config.input_shape[0]
            self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
            for cs in config.convs:
                self.convs.append(nn.Conv2d(c, cs.out_channels, cs.kernel, cs.stride, cs.padding))
                self.bns.append(nn.BatchNorm2d(cs.out_channels))
                c = cs.out_channels
            h1, h2 = config.hidden
            self.fcs = nn.ModuleList([nn.Linear(config.flat, h1), nn.Linear(h1, h2),
                                      nn.Linear(h2, config.classes)])
            self.fc_bns = nn.ModuleList([nn.BatchNorm1d(h1), nn.BatchNorm1d(h2)])
            self.acts = nn.ModuleList(poly_act(POLY_INIT, True) for _ in range(7))

        def forward(self, x):
            outs = []
            h = x
            for i, cs in enumerate(config.convs):
                z = self.bns[i](self.convs[i](h))
                h = self.acts[i](z)
                outs += [z, h]
                if cs.pool:
                    h = F.avg_pool2d(h, cs.pool[0], cs.pool[1])
            h = h.flatten(1)
            for j in range(2):
                z = self.fc_bns[j](self.fcs[j](h))
                h = self.acts[5 + j](z)
                outs += [z, h]
            logits = self.fcs[2](h)
            outs.append(logits * (bound / logit_bound))  # one --bound covers both
            # the penalty sees each image's largest value per layer, not the mean excess: a
            # deep stack of squares turns one rare large value into a huge one
            return logits, [o.flatten(1).abs().amax(1) for o in outs]

    return AlexNetTorch()


def export(net, config: AlexNetConfig) -> tuple[dict, list[list[float]]]:
    weights = {}
    for i, (conv, bn) in enumerate(zip(net.convs, net.bns, strict=True)):
        weights[f"conv{i + 1}"] = _fold_bn(conv.weight, conv.bias, bn)
    for j, fc in enumerate(net.fcs):
        weights[f"fc{j + 1}"] = _fold_bn(fc.weight, fc.bias, net.fc_bns[j] if j < 2 else None)
    acts = [[float(v) for v in a.coeffs.detach().double().numpy()] for a in net.acts]
    return weights, acts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m heinfer_models.train_alexnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-images", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=128)
    # per-image maxima over --bound are penalised (see forward): keeps every layer's values, and
    # the logits below --logit-bound, in range on unseen images too
    p.add_argument("--penalty", type=float, default=1.0)
    p.add_argument("--logit-bound", type=float, default=16.0)
    p.add_argument("--bound", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ZOO_DIR / NAME)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = FMNIST_32
    tr_img, tr_lab = fashion_mnist.load("train")
    te_img, te_lab = fashion_mnist.load("test")
    order = np.random.default_rng(args.seed).permutation(len(tr_img))[: args.train_images]
    x_train = fashion_mnist.fit_to(fashion_mnist.normalize(tr_img[order]), config.input_shape)
    y_train = tr_lab[order].astype(np.int64)
    x_test = fashion_mnist.fit_to(fashion_mnist.normalize(te_img), config.input_shape)
    y_test = te_lab.astype(np.int64)
    net = _build_torch(config, args.bound, args.logit_bound)
    print(f"{NAME}: training on {len(x_train)} images, {args.epochs} epochs", flush=True)
    secs = _train(net, "alexnet", args, x_train, y_train)
    weights, acts = export(net, config)
    model = build(config, NAME, weights, acts)
    model.labels = list(fashion_mnist.LABELS)
    logits, max_abs = oracle_eval(model, x_test)
    acc = float(np.mean(logits.argmax(1) == y_test))
    model.metadata = {
        "command": ".venv/bin/python -m heinfer_models.train_alexnet " + shlex.join(argv),
        "family": "alexnet", "architecture": "conv11x11/4(16)-conv3x3(32)-pool-conv(32)-"
        "conv(64)-conv(64)-pool-dense(128)-dense(64)-dense(10), trained degree-2 activations",
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), zero-padded to 32x32",
        "input_pad": "centered, black border (fashion_mnist.fit_to)",
        "normalization": {"mean": fashion_mnist.MEAN, "std": fashion_mnist.STD},
        "train_images": len(x_train), "epochs": args.epochs, "seed": args.seed,
        "lr": args.lr, "batch_size": args.batch_size, "train_seconds": round(secs, 1),
        "torch_version": torch.__version__, "torch_threads": args.threads,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "test_images": len(x_test), "plaintext_accuracy": round(acc, 6),
        "max_abs": {n: math.ceil(v * 1e6) / 1e6 for n, v in max_abs.items()},
        "input_max_abs": math.ceil(float(np.max(np.abs(x_test))) * 1e6) / 1e6,
        "penalty": args.penalty, "bound": args.bound, "logit_bound": args.logit_bound,
        "act_init": POLY_INIT,
        "batchnorm_folded": True,
        # depth 14: 24-bit data primes fit n=16384 (keys ~15 MB each instead of ~38 MB at
        # n=32768); lower() reads this when it chooses the parameters
        "scale_bits": 24,
    }
    save_model(model, args.out)
    if not np.array_equal(load_model(args.out).forward_batch(x_test[:100]), logits[:100]):
        raise RuntimeError("save/load round trip changed the logits")
    (args.out / "README.md").write_text(
        f"# {NAME}\n\n{model.metadata['architecture']}.\n\nPlaintext accuracy on the 10,000 "
        f"Fashion-MNIST test images (numpy oracle, padded to 32x32): {acc:.4f}.\n\n"
        f"{len(x_train)} training images, {args.epochs} epochs, {secs:.0f} s with torch "
        f"{torch.__version__}, {args.threads} threads:\n\n```\n{model.metadata['command']}\n```\n")
    print(f"{NAME}: accuracy {acc:.4f}, train {secs:.0f}s, saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
