"""HE-friendly rewrites: named passes, each Model -> Model, run top to bottom by `rewrite()`.

    remove_dropout        dropout is the identity at inference
    fold_batchnorm        eval-mode BatchNorm and affine maps folded into the preceding
                          conv/dense, else into the next one (exact)
    maxpool_to_avgpool    max pooling has no low-degree polynomial form: average pooling instead
    merge_dense           dense followed by dense (nothing between) is one dense: one level less
    fit_activations       ReLU, sigmoid, ... -> least-squares polynomial on the values the
                          activation sees on calibration data (degree chosen by the user)

With labelled calibration data the plaintext accuracy after every pass is recorded, so the report
shows what each substitution costs. Passes that change the function (maxpool, activations) say so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.reference import forward_layer
from heinfer_packing.modelfile import HE_OPS, Layer, Model
from heinfer_packing.onnx_identify import affine_layer


@dataclass
class RewriteRecord:
    name: str
    changes: list[str]
    exact: bool
    accuracy: float | None = None


def remove_dropout(model: Model, **_) -> tuple[Model, list[str], bool]:
    kept = [layer for layer in model.layers if layer.op != "dropout"]
    changes = [f"removed {layer.name}" for layer in model.layers if layer.op == "dropout"]
    return _with_layers(model, kept), changes, True


# Layers an affine map per channel passes through unchanged in form (to fold it forward)
_AFFINE_COMMUTES = ("flatten", "avgpool2d", "dropout")


def _fold_forward(layers: list[Layer], i: int) -> str:
    """Fold the affine (batchnorm-form) layers[i] into the next linear layer; returns its name.
    Exact: average pooling and flatten commute with a per-channel affine map; a shift before a
    zero-padded convolution would change the border, so that is refused."""
    bn = layers[i]
    a = bn.attrs
    s = np.asarray(a["scale"]) / np.sqrt(np.asarray(a["var"]) + a.get("eps", 1e-5))
    shift = np.asarray(a["bias"]) - np.asarray(a["mean"]) * s
    j = i + 1
    while j < len(layers) and layers[j].op in _AFFINE_COMMUTES:
        j += 1
    if j == len(layers) or layers[j].op not in ("conv2d", "dense"):
        raise ModelFormatError(f"{bn.name}: a BatchNorm or affine map (x * a + b) must be next to "
                               "a conv or dense layer to be folded (found "
                               f"{layers[j].op if j < len(layers) else 'the end'} after it)")
    nxt = copy.copy(layers[j])
    w = np.asarray(nxt.weight, dtype=np.float64)
    b = np.zeros(w.shape[0]) if nxt.bias is None else np.asarray(nxt.bias, dtype=np.float64)
    if nxt.op == "conv2d":
        if nxt.attrs.get("padding", 0) and np.any(shift != 0):
            raise ModelFormatError(f"{bn.name}: an affine map with a shift before the padded "
                                   f"convolution {nxt.name} cannot be folded exactly (normalise "
                                   "the input on the client instead)")
        nxt.bias = b + np.einsum("ocij,c->o", w, shift)
        nxt.weight = w * s[None, :, None, None]
    else:
        per = w.shape[1] // len(s)  # a flattened (C, H, W) map: H*W inputs per channel
        nxt.weight = w * np.repeat(s, per)[None]
        nxt.bias = b + w @ np.repeat(shift, per)
    layers[j] = nxt
    return nxt.name


def fold_batchnorm(model: Model, **_) -> tuple[Model, list[str], bool]:
    """BatchNorm and affine maps (x * a + b, from ONNX arithmetic with constants) into the
    preceding conv/dense layer, else into the next one."""
    out: list[Layer] = []
    changes = []
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        if layer.op != "batchnorm":
            out.append(copy.copy(layer))
            continue
        prev = out[-1] if out else None
        if prev is None or prev.op not in ("conv2d", "dense"):
            changes.append(f"folded {layer.name} into {_fold_forward(layers, i)} (after it)")
            continue
        a = layer.attrs
        s = np.asarray(a["scale"]) / np.sqrt(np.asarray(a["var"]) + a.get("eps", 1e-5))
        w = prev.weight * s.reshape((-1,) + (1,) * (prev.weight.ndim - 1))
        b = prev.bias if prev.bias is not None else np.zeros(prev.weight.shape[0])
        prev.weight, prev.bias = w, (b - np.asarray(a["mean"])) * s + np.asarray(a["bias"])
        changes.append(f"folded {layer.name} into {prev.name}")
    return _with_layers(model, out), changes, True


def maxpool_to_avgpool(model: Model, **_) -> tuple[Model, list[str], bool]:
    out, changes = [], []
    for layer in model.layers:
        if layer.op == "maxpool2d":
            out.append(Layer(layer.name, "avgpool2d", dict(layer.attrs)))
            changes.append(f"{layer.name}: max -> average pooling")
        else:
            out.append(layer)
    return _with_layers(model, out), changes, not changes


def merge_dense(model: Model, **_) -> tuple[Model, list[str], bool]:
    out: list[Layer] = []
    changes = []
    for layer in model.layers:
        prev = out[-1] if out else None
        if layer.op == "dense" and prev is not None and prev.op == "dense":
            b_prev = prev.bias if prev.bias is not None else np.zeros(prev.weight.shape[0])
            b = (layer.bias if layer.bias is not None else 0.0) + layer.weight @ b_prev
            out[-1] = Layer(f"{prev.name}+{layer.name}", "dense", {}, layer.weight @ prev.weight,
                            np.asarray(b, dtype=np.float64))
            changes.append(f"merged {prev.name} and {layer.name}")
        else:
            out.append(layer)
    return _with_layers(model, out), changes, True


def fit_activations(model: Model, calib_x: np.ndarray | None = None, degree: int = 2,
                    **_) -> tuple[Model, list[str], bool]:
    """Replace each non-polynomial activation by the least-squares polynomial of `degree` over the
    values it receives on the calibration inputs (plus a uniform grid over their range, so the
    ends stay bounded)."""
    acts = [i for i, layer in enumerate(model.layers) if layer.op == "activation"]
    if not acts:
        return model, [], True
    layers = list(model.layers)
    changes = []
    exact = True
    # the calibration inputs as they reach layer `pos` (through the polynomials already fitted):
    # each layer runs once, not once per later activation (AlexNet at 224: 7 activations)
    pos, seen = 0, None if calib_x is None else list(calib_x)
    for i in acts:
        fn = layers[i].attrs["fn"]
        if fn == "square":
            layers[i] = Layer(layers[i].name, "poly", {"coeffs": [0.0, 0.0, 1.0]})
            continue
        if seen is None:
            raise ModelFormatError(f"{layers[i].name}: approximating {fn} needs calibration "
                                   "inputs (compile with calibration data)")
        for layer in layers[pos:i]:
            seen = [forward_layer(layer, x) for x in seen]
        pos = i
        x = seen[0]
        values = [np.ravel(v) for v in seen]
        v = np.concatenate(values)
        v = v[np.random.default_rng(0).choice(len(v), min(len(v), 200_000), replace=False)]
        lo, hi = float(v.min()), float(v.max())
        grid = np.linspace(lo, hi, max(100, len(v) // 20))
        xs = np.concatenate([v, grid])
        ys = forward_layer(layers[i], xs)
        coeffs = np.polynomial.polynomial.polyfit(xs, ys, degree)
        # a term worth nothing on the range is a rounding residue (hardswish is exactly
        # x/2 + x^2/6 near 0): drop it, or its plaintext would encode to zero
        reach = max(abs(lo), abs(hi), 1e-12) ** np.arange(degree + 1)
        coeffs[np.abs(coeffs) * reach < 1e-6 * (np.abs(coeffs) * reach).max()] = 0.0
        if not np.any(coeffs[2:]):
            # linear where the data lies (a clip never reached): an affine map, folded into a
            # neighbouring linear layer below instead of a polynomial on ciphertexts
            n = len(values[0]) if x.ndim == 1 else x.shape[0]
            layers[i] = affine_layer(layers[i].name, np.full(n, coeffs[1]), np.full(n, coeffs[0]))
            changes.append(f"{layers[i].name}: {fn} is linear on [{lo:.2f}, {hi:.2f}]: "
                           "folded as x * a + b")
            exact = False
            continue
        layers[i] = Layer(layers[i].name, "poly", {"coeffs": [float(c) for c in coeffs],
                                                   "fitted": fn, "range": [lo, hi]})
        changes.append(f"{layers[i].name}: {fn} -> degree-{degree} polynomial on "
                       f"[{lo:.2f}, {hi:.2f}]")
        exact = False
    out = _with_layers(model, layers)
    if any(layer.op == "batchnorm" for layer in layers):
        for p in (fold_batchnorm, merge_dense):
            out, more, _ = p(out)
            changes += more
    return out, changes, exact


PASSES = [remove_dropout, fold_batchnorm, maxpool_to_avgpool, merge_dense, fit_activations]


def _with_layers(model: Model, layers: list[Layer]) -> Model:
    return Model(model.name, model.input_shape, layers, model.labels, dict(model.metadata))


def _accuracy(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    preds = [int(np.argmax(model.forward(xi))) for xi in x]
    return float(np.mean(np.asarray(preds) == y))


def rewrite(model: Model, calib_x: np.ndarray | None = None, calib_y: np.ndarray | None = None,
            degree: int = 2) -> tuple[Model, list[RewriteRecord]]:
    """Run every pass; returns the HE-friendly model and one record per pass (with plaintext
    accuracy on the labelled calibration data when given)."""
    from heinfer_packing.calib_data import check_shape

    if calib_x is not None:  # a mismatch is one clear error, not an assertion deep in a layer
        calib_x = check_shape(calib_x, model.input_shape, "calib_x")
    if calib_y is not None and (calib_x is None or len(calib_y) != len(calib_x)):
        raise ModelFormatError("calibration labels need calibration images, one label each")
    records = []
    if calib_y is not None:
        records.append(RewriteRecord("original", [], True, _accuracy(model, calib_x, calib_y)))
    for p in PASSES:
        model, changes, exact = p(model, calib_x=calib_x, degree=degree)
        acc = (_accuracy(model, calib_x, calib_y)
               if calib_y is not None and changes else None)
        records.append(RewriteRecord(p.__name__, changes, exact, acc))
    left = {layer.op for layer in model.layers} - HE_OPS
    if left:
        raise ModelFormatError(f"after rewrites the model still has {sorted(left)}")
    return model, records


def format_records(records: list[RewriteRecord]) -> str:
    lines = ["| pass | changes | exact | plaintext accuracy |", "|---|---|---|---|"]
    for r in records:
        acc = f"{r.accuracy:.2%}" if r.accuracy is not None else "-"
        lines.append(f"| {r.name} | {'; '.join(r.changes) or '-'} | {'yes' if r.exact else 'no'} "
                     f"| {acc} |")
    return "\n".join(lines)
