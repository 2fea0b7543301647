"""Plaintext numpy forward pass, one layer at a time: the oracle HE kernels are checked against."""

from __future__ import annotations

from typing import Any

import numpy as np


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int,
           padding: int) -> np.ndarray:
    """x (Ci, H, W), weight (Co, Ci, kh, kw) -> (Co, Ho, Wo); cross-correlation as in PyTorch."""
    ci, h, w = x.shape
    co, ci_w, kh, kw = weight.shape
    assert ci == ci_w, (x.shape, weight.shape)
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    out = np.zeros((co, ho, wo))
    for di in range(kh):
        for dj in range(kw):
            patch = xp[:, di : di + stride * ho : stride, dj : dj + stride * wo : stride]
            out += np.einsum("oc,chw->ohw", weight[:, :, di, dj], patch)
    if bias is not None:
        out += bias[:, None, None]
    return out


def avgpool2d(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    c, h, w = x.shape
    ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    out = np.zeros((c, ho, wo))
    for di in range(kernel):
        for dj in range(kernel):
            out += x[:, di : di + stride * ho : stride, dj : dj + stride * wo : stride]
    return out / (kernel * kernel)


def poly(x: np.ndarray, coeffs: list[float]) -> np.ndarray:
    return np.polynomial.polynomial.polyval(x, np.asarray(coeffs, dtype=np.float64))


def dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    out = weight @ x
    return out + bias if bias is not None else out


def maxpool2d(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    c, h, w = x.shape
    ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    out = np.full((c, ho, wo), -np.inf)
    for di in range(kernel):
        for dj in range(kernel):
            out = np.maximum(out, x[:, di : di + stride * ho : stride,
                                    dj : dj + stride * wo : stride])
    return out


def batchnorm(x: np.ndarray, scale, bias, mean, var, eps: float) -> np.ndarray:
    shape = (-1,) + (1,) * (x.ndim - 1)
    s = np.asarray(scale) / np.sqrt(np.asarray(var) + eps)
    return (x - np.reshape(mean, shape)) * np.reshape(s, shape) + np.reshape(bias, shape)


def _erf(x: np.ndarray) -> np.ndarray:
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "square": lambda x: x * x,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi)
                                                     * (x + 0.044715 * x**3))),
    "hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "softplus": _softplus,
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
}
# Activations with parameters in the layer's attrs
PARAM_ACTIVATIONS = {
    "clip": lambda x, a: np.clip(x, a["min"], a["max"]),
    "leaky_relu": lambda x, a: np.where(x > 0, x, a["alpha"] * x),
}


def activation(x: np.ndarray, attrs: dict) -> np.ndarray:
    fn = attrs["fn"]
    if fn in PARAM_ACTIVATIONS:
        return PARAM_ACTIVATIONS[fn](x, attrs)
    return ACTIVATIONS[fn](x)


def forward_layer(layer: Any, x: np.ndarray) -> np.ndarray:
    """Apply one `packing.modelfile.Layer` to x."""
    a = layer.attrs
    if layer.op == "conv2d":
        return conv2d(x, layer.weight, layer.bias, a.get("stride", 1), a.get("padding", 0))
    if layer.op == "avgpool2d":
        return avgpool2d(x, a["kernel"], a.get("stride", a["kernel"]))
    if layer.op == "poly":
        return poly(x, a["coeffs"])
    if layer.op == "flatten":
        return x.reshape(-1)
    if layer.op == "dense":
        return dense(x, layer.weight, layer.bias)
    if layer.op == "maxpool2d":
        return maxpool2d(x, a["kernel"], a.get("stride", a["kernel"]))
    if layer.op == "activation":
        return activation(x, a)
    if layer.op == "batchnorm":
        return batchnorm(x, a["scale"], a["bias"], a["mean"], a["var"], a.get("eps", 1e-5))
    if layer.op == "dropout":
        return x
    raise ValueError(f"unknown op {layer.op!r}")
