"""Conformal linearized layers (Sousa, Fernandes, Vasconcelos, SIBGRAPI 2021, arXiv 2110.12108).

A ReSPro network carries a pair (y, w) standing for the point y / w: y = x, w = ||x|| at the
input; bias-free convolutions and average pooling act on y only; each ReSPro activation updates
w <- (||y||^2 + a^2 w) / (2a) with a > 0. Unrolling the recursion over K blocks, with L_k the
linear map from x to the y after block k:

    w_K = c0 ||x|| + sum_k coef_k ||L_k x||^2,   c0 = prod_k a_k / 2,
    coef_k = (prod_{j>k} a_j / 2) / (2 a_k),

so the whole stack and its classifier (W, b) collapse to

    logits = M x / (c0 ||x|| + x^T T x) + b,   M = W L_K,   T = sum_k coef_k L_k^T L_k = R^T R.

The server computes z = M x and q = ||R x||^2 on ciphertexts (depth 2 whatever K is); the client,
which knows x, adds c0 ||x||, divides and adds b. R is either the stacked per-block factors
sqrt(coef_k) L_k or, when that has more rows, the low-rank factor from T's eigendecomposition;
the choice is recorded. Never rescale x or (y, w): the map is not homogeneous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from heinfer import reference
from heinfer.errors import ModelFormatError


@dataclass
class ConformalBlock:
    weight: np.ndarray          # (Co, Ci, k, k), no bias
    a: float                    # ReSPro parameter, > 0
    stride: int = 1
    padding: int = 0
    pool: int | None = None     # average pooling kernel (= stride) after the convolution

    def linear(self, y: np.ndarray) -> np.ndarray:
        y = reference.conv2d(y, self.weight, None, self.stride, self.padding)
        return reference.avgpool2d(y, self.pool, self.pool) if self.pool else y


@dataclass
class ConformalNet:
    input_shape: tuple[int, int, int]
    blocks: list[ConformalBlock]
    classifier_weight: np.ndarray   # (classes, features of the last y)
    classifier_bias: np.ndarray
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(not b.a > 0 for b in self.blocks):
            raise ModelFormatError("every ReSPro parameter a must be > 0 (the denominator "
                                   "must stay positive)")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Layer by layer, as trained: the oracle the collapse is checked against."""
        y = np.asarray(x, dtype=np.float64)
        w = float(np.linalg.norm(y))
        for b in self.blocks:
            y = b.linear(y)
            w = (float(np.sum(y * y)) + b.a * b.a * w) / (2 * b.a)
        return self.classifier_weight @ (y.reshape(-1) / w) + self.classifier_bias


@dataclass
class Collapsed:
    M: np.ndarray           # (classes, N)
    R: np.ndarray           # (rank, N), T = R^T R
    c0: float
    bias: np.ndarray
    factor: str             # "per-block" or "low-rank"

    def forward(self, x: np.ndarray) -> np.ndarray:
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        denom = self.c0 * np.linalg.norm(v) + float(np.sum((self.R @ v) ** 2))
        return self.M @ v / denom + self.bias

    def finish(self, z: np.ndarray, q: float, x: np.ndarray) -> np.ndarray:
        """Client side: from the decrypted z = M x and q = ||R x||^2 to logits."""
        return z / (self.c0 * np.linalg.norm(np.asarray(x).reshape(-1)) + q) + self.bias


def linear_maps(net: ConformalNet) -> list[np.ndarray]:
    """L_k as matrices (features after block k, N inputs), by pushing the basis through."""
    n = int(np.prod(net.input_shape))
    eye = np.eye(n)  # one identity, not one per column (784 of them cost seconds)
    maps, cols = [], [eye[i].reshape(net.input_shape) for i in range(n)]
    for b in net.blocks:
        cols = [b.linear(c) for c in cols]
        maps.append(np.stack([c.reshape(-1) for c in cols], axis=1))
    return maps


def collapse(net: ConformalNet, rank_tol: float = 1e-10) -> Collapsed:
    a = [b.a for b in net.blocks]
    maps = linear_maps(net)
    c0 = math.prod(ak / 2 for ak in a)
    coefs = [math.prod(aj / 2 for aj in a[k + 1:]) / (2 * a[k]) for k in range(len(a))]
    per_block = np.concatenate([math.sqrt(c) * L for c, L in zip(coefs, maps, strict=True)])
    T = per_block.T @ per_block
    eig, vec = np.linalg.eigh(T)
    keep = eig > rank_tol * max(eig.max(), 1e-300)
    low_rank = (np.sqrt(eig[keep])[:, None] * vec[:, keep].T)[::-1]
    R, factor = ((per_block, "per-block") if len(per_block) <= len(low_rank)
                 else (low_rank, "low-rank"))
    M = net.classifier_weight @ maps[-1]
    return Collapsed(M, R, c0, np.asarray(net.classifier_bias, dtype=np.float64), factor)


def save_conformal(net: ConformalNet, directory, name: str, labels: list[str] | None = None,
                   metadata: dict | None = None):
    """`DIR/conformal.json` (blocks: stride, padding, pool, a) + `DIR/weights.npz`
    (`block{i}.weight`, `classifier.weight`, `classifier.bias`)."""
    import json
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = {"format": "heinfer-conformal", "version": 1, "name": name,
           "input_shape": list(net.input_shape),
           "blocks": [{"stride": b.stride, "padding": b.padding, "pool": b.pool, "a": b.a}
                      for b in net.blocks],
           "labels": labels or [], "metadata": {**net.metadata, **(metadata or {})}}
    (d / "conformal.json").write_text(json.dumps(doc, indent=1) + "\n")
    arrays = {f"block{i}.weight": b.weight for i, b in enumerate(net.blocks)}
    arrays["classifier.weight"] = net.classifier_weight
    arrays["classifier.bias"] = net.classifier_bias
    np.savez_compressed(d / "weights.npz", **arrays)
    return d


def load_conformal(directory) -> tuple[ConformalNet, dict]:
    import json
    from pathlib import Path

    d = Path(directory)
    try:
        doc = json.loads((d / "conformal.json").read_text())
    except FileNotFoundError as e:
        raise ModelFormatError(f"no conformal.json in {d}") from e
    if doc.get("format") != "heinfer-conformal" or doc.get("version") != 1:
        raise ModelFormatError(f"{d}/conformal.json is not a heinfer-conformal v1 file")
    from heinfer.plan import read_npz

    w = read_npz(d / "weights.npz")
    try:
        blocks = [ConformalBlock(w[f"block{i}.weight"], float(b["a"]), b["stride"],
                                 b["padding"], b["pool"]) for i, b in enumerate(doc["blocks"])]
        net = ConformalNet(tuple(doc["input_shape"]), blocks, w["classifier.weight"],
                           w["classifier.bias"], doc.get("metadata", {}))
    except KeyError as e:
        raise ModelFormatError(f"{d}: missing weights or attribute {e}") from e
    return net, doc


def lower_conformal(net: ConformalNet, name: str, labels: list[str] | None = None,
                    calib_x: np.ndarray | None = None, params=None, replicas: int = 2):
    """Collapse and lower to a one-step plan (`ConformalKernel`: z = M x and q = ||R x||^2; the
    client sends x in `replicas` copies, which halves the dense layers' work). Depth 2 for any
    number of blocks; parameters chosen for depth 2, the first prime holding q."""
    from heinfer.layout import GridLayout
    from heinfer.plan import Plan, PlanStep
    from heinfer_packing.lower import choose_params

    col = collapse(net)
    n_logits = col.M.shape[0]
    q_max = 100.0
    if calib_x is not None and len(calib_x):
        q_max = max(float(np.sum((col.R @ np.asarray(x).reshape(-1)) ** 2)) for x in calib_x)
    headroom = math.ceil(math.log2(max(q_max, 1.0) * 2)) + 1
    # a 40-bit scale: z and q are small and the client divides by q, so precision counts
    params = params or choose_params(2, scale_bits=40, final_rescale=False, out_bits=headroom)
    c, h, w = net.input_shape
    layout = GridLayout((c, h, w), params.slots, c, h * w, w, 1, 0,
                        replicas, params.slots // replicas)
    steps = [PlanStep("conformal", {"n_logits": n_logits, "headroom_bits": headroom},
                      np.vstack([col.M, col.R]), None)]
    plan = Plan(name, params, tuple(net.input_shape), layout, steps, 1.0, list(labels or []),
                {"conformal": {"factor": col.factor, "rank": int(col.R.shape[0]),
                               "blocks": len(net.blocks)},
                 "output": {"kind": "conformal", "c0": col.c0,
                            "bias": [float(b) for b in col.bias]}})
    return plan, col
