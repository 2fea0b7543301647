"""Name what a sub-graph computes, from its values (see packing/onnx_graph.py).

- An element-wise region (one tensor in, one out, element-wise operators and constants only) is
  evaluated on a grid of values: it is an affine map per channel (BatchNorm, `x / 255`,
  `(x - m) * s`, a bias), or a * g(x) + c for a known activation g (ReLU, ReLU6, GELU in its erf
  or tanh form, SiLU, HardSwish, ...), or a clip / leaky ReLU with its parameters.
- A layout segment (Transpose, Reshape, GatherND, ReduceMean, Expand, ...) is a linear map; it
  is evaluated on basis inputs: a reshape (no layer or `flatten`), an average pooling, or, when it
  moves values within each channel in another way (adaptive pooling that repeats or overlaps
  windows), a `dense` layer that `merge_dense` folds into the dense layer after it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.reference import ACTIVATIONS, avgpool2d
from heinfer_packing.modelfile import Layer

Evaluate = Callable[[np.ndarray], np.ndarray]
GRID = np.concatenate([np.linspace(-16.0, 16.0, 321), [-0.37, 0.61, 2.3, -2.9]])
MAX_MAP = 4096  # a layout change on a larger map is refused (one evaluation per position)


def affine_layer(name: str, scale: np.ndarray, bias: np.ndarray) -> Layer:
    """A per-channel (or per-feature) x * scale + bias, as a BatchNorm `fold_batchnorm` folds."""
    n = len(scale)
    return Layer(name, "batchnorm", {"scale": [float(v) for v in scale],
                                     "bias": [float(v) for v in bias], "mean": [0.0] * n,
                                     "var": [1.0] * n, "eps": 0.0, "affine": True})


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> bool:
    return bool(np.all(np.abs(a - b) <= tol * (1.0 + np.abs(b))))


def _scalar_function(f: np.ndarray, name: str, channels: int) -> list[Layer] | None:
    t = GRID
    ones = np.ones_like(t)
    (s, b), *_ = np.linalg.lstsq(np.stack([t, ones], 1), f, rcond=None)
    if _close(s * t + b, f):
        if abs(s - 1) < 1e-6 and abs(b) < 1e-6:
            return []
        return [affine_layer(name, np.full(channels, s), np.full(channels, b))]
    for fn, g in ACTIVATIONS.items():
        gv = g(t)
        (a, c), *_ = np.linalg.lstsq(np.stack([gv, ones], 1), f, rcond=None)
        if abs(a) > 1e-6 and _close(a * gv + c, f):
            act = [Layer(name, "activation", {"fn": fn})]
            if abs(a - 1) < 1e-6 and abs(c) < 1e-6:
                return act
            return act + [affine_layer(f"{name}.affine", np.full(channels, a),
                                       np.full(channels, c))]
    lo, hi = float(f.min()), float(f.max())
    if t.min() < lo < hi < t.max() and _close(np.clip(t, lo, hi), f):
        return [Layer(name, "activation", {"fn": "clip", "min": lo, "max": hi})]
    alpha = float(f[0] / t[0])
    if _close(np.where(t > 0, t, alpha * t), f):
        return [Layer(name, "activation", {"fn": "leaky_relu", "alpha": alpha})]
    return None


def elementwise_layers(ev: Evaluate, shape: tuple[int, ...], name: str,
                       where: str) -> list[Layer]:
    """Layers for an element-wise region on tensors of `shape` (batch dimension excluded)."""
    n_grid = len(GRID)
    # one position per channel is enough unless a constant varies by position (it then
    # broadcasts the result to more positions, and the full map is evaluated)
    small = (shape[0],) + (1,) * (len(shape) - 1)
    x = GRID.reshape((n_grid,) + (1,) * len(shape)) * np.ones((1,) + small)
    y = ev(x)
    if y.shape != x.shape:
        x = GRID.reshape((n_grid,) + (1,) * len(shape)) * np.ones((1,) + shape)
        y = ev(x)
    if y.shape != x.shape:
        raise ModelFormatError(f"{where}: changes the shape {shape} -> {y.shape[1:]}")
    flat = y.reshape(n_grid, -1)
    channels = shape[0]
    if _close(flat, np.repeat(flat[:, :1], flat.shape[1], 1), 1e-6):
        found = _scalar_function(flat[:, 0], name, channels)
        if found is None:
            raise ModelFormatError(
                f"{where}: computes an element-wise function heinfer does not recognise (known: "
                f"affine maps, {sorted(ACTIVATIONS)}, clip, leaky_relu)")
        return found
    # a different affine map per element: BatchNorm, a per-channel bias or normalisation
    i0, i1 = int(np.argmin(np.abs(GRID))), int(np.argmin(np.abs(GRID - 1.0)))
    s = (flat[i1] - flat[i0]) / (GRID[i1] - GRID[i0])
    b = flat[i0] - s * GRID[i0]
    if not _close(GRID[:, None] * s[None] + b[None], flat, 1e-4):
        raise ModelFormatError(f"{where}: an element-wise function that differs between channels "
                               "and is not affine; unsupported")
    per = (shape[0], -1)
    s2, b2 = s.reshape(per), b.reshape(per)
    if not (_close(s2, s2[:, :1], 1e-6) and _close(b2, b2[:, :1], 1e-6)):
        raise ModelFormatError(f"{where}: an affine map that varies within a channel "
                               "(by position); only per-channel constants are supported")
    return [affine_layer(name, s2[:, 0], b2[:, 0])]


def _avgpool_matrix(h: int, w: int, k: int) -> np.ndarray:
    basis = np.eye(h * w).reshape(h * w, h, w)
    return avgpool2d(basis, k, k).reshape(h * w, -1).T


def _spatial_matrix(ev: Evaluate, shape: tuple[int, ...], out_shape: tuple[int, ...],
                    where: str) -> np.ndarray:
    """P (Q, H*W) with out[c] = P @ x[c] for every channel c, checked on a random input."""
    c, h, w = shape
    hw = h * w
    if hw > MAX_MAP:
        raise ModelFormatError(f"{where}: a layout change on a {h}x{w} map; heinfer evaluates "
                               f"these on maps of at most {MAX_MAP} positions")
    def unit(ks: range) -> np.ndarray:  # position k set to 1 in every channel, one per row
        b = np.zeros((len(ks), c, hw))
        b[np.arange(len(ks)), :, list(ks)] = 1.0
        return b.reshape(len(ks), c, h, w)

    def run(ks: range) -> np.ndarray:
        out = ev(unit(ks))
        if out.shape[0] != len(ks):
            raise ValueError("the segment does not keep the batch dimension")
        return out.reshape(len(ks), c, -1)

    chunk = max(1, (1 << 22) // (c * hw))  # batches of at most 4M values (32 MB)
    try:  # many positions per run when the segment keeps the batch dimension
        ys = np.concatenate([run(range(k, min(hw, k + chunk))) for k in range(0, hw, chunk)])
    except Exception:  # noqa: BLE001 - e.g. a Reshape to a constant (1, -1)
        ys = np.concatenate([run(range(k, k + 1)) for k in range(hw)])
    p = ys[:, 0, :].T
    x = np.random.default_rng(0).normal(size=shape)
    expected = ev(x[None]).reshape(-1)
    got = (x.reshape(c, hw) @ p.T).reshape(-1)
    if got.shape != expected.shape or not _close(got, expected, 1e-4):
        raise ModelFormatError(f"{where}: a layout change {shape} -> {out_shape} that mixes "
                               "channels (a real Transpose, a channel shuffle); unsupported")
    return p


def _as_avgpool(x: np.ndarray, y: np.ndarray, name: str, flat: bool) -> list[Layer] | None:
    """The layers when y is x average-pooled by k x k windows with stride k (k | H = W)."""
    c, h, w = x.shape
    q = y.size // c
    ho = int(round(np.sqrt(q)))
    if y.size != c * q or h != w or ho * ho != q or h % ho:
        return None
    k = h // ho
    if not _close(avgpool2d(x, k, k).reshape(-1), y.reshape(-1), 1e-5):
        return None
    layers = [Layer(name, "avgpool2d", {"kernel": k, "stride": k})] if k > 1 else []
    return layers + ([Layer(f"{name}.flatten", "flatten")] if flat else [])


def movement_layers(ev: Evaluate, shape: tuple[int, ...], name: str,
                    where: str) -> tuple[list[Layer], list[str]]:
    """Layers (and import notes) for a layout segment on an input of `shape`."""
    x = np.random.default_rng(1).normal(size=shape)
    y = ev(x[None])
    if y.ndim == 0 or y.shape[0] != 1:
        raise ModelFormatError(f"{where}: changes the batch dimension ({(1,) + shape} -> "
                               f"{y.shape}); unsupported")
    out_shape = y.shape[1:]
    if y.size == x.size and _close(y.reshape(-1), x.reshape(-1), 1e-6):
        if len(out_shape) == 1:
            return ([Layer(name, "flatten")] if len(shape) > 1 else []), []
        if out_shape == shape:
            return [], []
        raise ModelFormatError(f"{where}: reshapes {shape} to {out_shape}; heinfer keeps maps as "
                               "(C, H, W) and vectors flat")
    if len(shape) != 3:
        return _vector_map(ev, shape[0], out_shape, name, where)
    c, h, w = shape
    pooled = _as_avgpool(x, y, name, len(out_shape) == 1)
    if pooled is not None:  # a global mean or an evenly dividing adaptive pooling: no basis runs
        return pooled, []
    p = _spatial_matrix(ev, shape, out_shape, where)
    q = p.shape[0]
    flat = [Layer(f"{name}.flatten", "flatten")] if len(out_shape) == 1 else []
    ho = int(round(np.sqrt(q)))
    if h == w and ho * ho == q and h % ho == 0 and np.allclose(p, _avgpool_matrix(h, w, h // ho),
                                                               atol=1e-6):
        k = h // ho
        return ([Layer(name, "avgpool2d", {"kernel": k, "stride": k})] if k > 1 else []) + flat, []
    dense = Layer(name, "dense", {"spatial_map": [q, h * w]}, np.kron(np.eye(c), p), None)
    note = (f"{where}: a layout change within each channel ({h}x{w} -> {q} values, e.g. an "
            "adaptive pooling that repeats or overlaps windows) became a dense layer; "
            "merge_dense folds it into the dense layer that follows")
    return [Layer(f"{name}.flatten", "flatten"), dense], [note]


def _vector_map(ev: Evaluate, n: int, out_shape: tuple[int, ...], name: str,
                where: str) -> tuple[list[Layer], list[str]]:
    """A linear map on a vector (e.g. reshaped to (n, 1, 1) and pooled back up): one dense
    layer, its matrix from the unit vectors, checked on a random input."""
    if n > MAX_MAP or len(out_shape) != 1:
        raise ModelFormatError(f"{where}: turns a vector of {n} values into shape {out_shape}; "
                               "heinfer supports that only when the result is flattened and the "
                               f"vector has at most {MAX_MAP} values")
    cols = [ev(np.eye(n)[k][None]).reshape(-1) for k in range(n)]
    m = np.stack(cols, 1)
    x = np.random.default_rng(2).normal(size=n)
    if not _close(m @ x, ev(x[None]).reshape(-1), 1e-4):
        raise ModelFormatError(f"{where}: not a linear map of its input; unsupported")
    note = (f"{where}: a linear map on a vector ({n} -> {m.shape[0]} values) became a dense "
            "layer; merge_dense folds it into the dense layer that follows")
    return [Layer(name, "dense", {"vector_map": [m.shape[0], n]}, m, None)], [note]
