"""ONNX import: what torch's exporters (the default dynamo one, opset 17-20, and the legacy one)
emit for CNNs, as a chain of heinfer layers.

    torch.onnx.export(net.eval(), (torch.zeros(1, C, H, W),), "model.onnx")

The graph is first folded and shape-inferred by onnx/onnxscript (packing/onnx_graph.py). Then
the chain is walked from the input, one step per kind of node:

- convolution, Gemm/MatMul, max and average pooling, a zero Pad (merged into the next Conv):
  read from their attributes;
- element-wise regions (activations however they are spelled, BatchNorm, arithmetic with
  constants): identified by evaluation (packing/onnx_identify.py); affine maps become
  `batchnorm`-form layers that `fold_batchnorm` folds into a neighbouring linear layer;
- layout segments (Transpose, Reshape, Squeeze/Unsqueeze, Identity, Cast, Dropout, ReduceMean,
  GlobalAveragePool, GatherND, Expand, ...): identified by evaluation as no-ops, flatten,
  average pooling, or a within-channel linear map folded into the next dense layer;
- a final Softmax/LogSoftmax is dropped with a note (argmax is unchanged).

A branch (a residual Add, a Concat) fails naming the node: the IR is a chain; graphs are issue
#11. Unsupported operators fail naming the node, the operator and the supported ones. The
imported model is checked against onnx's reference evaluator on a random input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.reference import forward_layer
from heinfer_packing.modelfile import Layer, Model
from heinfer_packing.onnx_graph import OnnxGraph, prepare
from heinfer_packing.onnx_identify import affine_layer, elementwise_layers, movement_layers

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Exp", "Erf",
               "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
               "Softplus", "Elu", "Selu", "Celu", "Mish", "Gelu", "PRelu", "Softsign", "Abs",
               "Sign", "Log", "Max", "Min", "BatchNormalization",
               "Where", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Not",
               "And", "Or"}
MOVEMENT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast",
            "Dropout", "ReduceMean", "GlobalAveragePool", "GatherND", "Gather", "Expand",
            "Tile", "Slice", "Where"}
# linear element-wise operators a layout segment may contain (adaptive pooling with overlapping
# windows decomposes into Gather, Where, Add and a Div by the window sizes)
LINEAR = MOVEMENT | {"Add", "Sub", "Mul", "Div", "Neg", "Where"}
STRUCTURAL = {"Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "Pad"}
FINAL = {"Softmax", "LogSoftmax"}
SUPPORTED = sorted(ELEMENTWISE | MOVEMENT | STRUCTURAL | FINAL)
BRANCH_HINT = ("heinfer's IR is a chain of layers; skip connections (residual Add, Concat) need "
               "the graph IR of issue #11, which heinfer does not have yet")


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _symmetric_pad(pads: list[int], where: str) -> int:
    if not pads:
        return 0
    if len(set(pads)) != 1:
        raise ModelFormatError(f"{where}: asymmetric padding {list(pads)} is not supported")
    return int(pads[0])


def _need_map(probe: np.ndarray, where: str) -> None:
    if probe.ndim != 3:
        raise ModelFormatError(f"{where}: needs a (C, H, W) map, gets a vector of {probe.size} "
                               "values")


def _conv(g: OnnxGraph, node, where: str, probe: np.ndarray, pad: int) -> Layer:
    _need_map(probe, where)
    a = _attrs(node)
    if node.input[1] not in g.consts:
        raise ModelFormatError(f"{where}: weights computed at run time are not supported")
    if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
        raise ModelFormatError(f"{where}: groups and dilations are not supported")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelFormatError(f"{where}: auto_pad is not supported (export explicit padding)")
    strides = a.get("strides", [1, 1])
    if len(set(strides)) != 1:
        raise ModelFormatError(f"{where}: unequal strides {strides}")
    bias = g.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    return Layer(node.name or "conv", "conv2d",
                 {"stride": int(strides[0]),
                  "padding": _symmetric_pad(a.get("pads", []), where) + pad},
                 g.consts[node.input[1]], bias)


def _dense(g: OnnxGraph, node, where: str, probe: np.ndarray) -> Layer:
    if probe.ndim != 1:
        raise ModelFormatError(f"{where}: needs a flat vector, gets shape {probe.shape} "
                               "(flatten before it)")
    a = _attrs(node)
    if node.input[1] not in g.consts or node.input[0] in g.consts:
        raise ModelFormatError(f"{where}: only data x constant weights are supported")
    w = g.consts[node.input[1]]
    if node.op_type == "MatMul":
        w, b = w.T, None
    else:
        if a.get("transA", 0):
            raise ModelFormatError(f"{where}: transA is not supported")
        w = w * a.get("alpha", 1.0) if a.get("transB", 0) else w.T * a.get("alpha", 1.0)
        b = (np.broadcast_to(g.consts[node.input[2]] * a.get("beta", 1.0), (w.shape[0],)).copy()
             if len(node.input) > 2 and node.input[2] else None)
    return Layer(node.name or "dense", "dense", {}, w, b)


def _pool(node, where: str, probe: np.ndarray) -> Layer:
    _need_map(probe, where)
    a = _attrs(node)
    k = a["kernel_shape"]
    s = a.get("strides", k)
    if (len(set(k)) != 1 or len(set(s)) != 1 or _symmetric_pad(a.get("pads", []), where)
            or a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1]))):
        raise ModelFormatError(f"{where}: only square, unpadded pooling (no ceil mode, no "
                               "dilation) is supported")
    kind = "maxpool2d" if node.op_type == "MaxPool" else "avgpool2d"
    return Layer(node.name or kind, kind, {"kernel": int(k[0]), "stride": int(s[0])})


def _pad(g: OnnxGraph, node, where: str, probe: np.ndarray) -> int:
    _need_map(probe, where)
    a = _attrs(node)
    pads = g.consts.get(node.input[1]) if len(node.input) > 1 else a.get("pads")
    value = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
    mode = a.get("mode", b"constant")
    if (pads is None or mode not in (b"constant", "constant") or np.any(np.asarray(value) != 0)
            or (len(node.input) > 3 and node.input[3])):
        raise ModelFormatError(f"{where}: only zero padding with constant pads is supported")
    pads = [int(p) for p in np.ravel(pads)]
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
        raise ModelFormatError(f"{where}: only spatial padding is supported, got {pads}")
    nxt = g.consumers.get(node.output[0], [])
    if len(nxt) != 1 or g.nodes[nxt[0]].op_type != "Conv":
        raise ModelFormatError(f"{where}: zero padding is supported before a convolution only")
    return _symmetric_pad([pads[2], pads[3], pads[6], pads[7]], where)


def _unsupported(g: OnnxGraph, i: int) -> ModelFormatError:
    node = g.nodes[i]
    return ModelFormatError(f"{g.source}: {g.label(node, i)}: operator {node.op_type!r} is not "
                            f"imported by heinfer; supported: {SUPPORTED}")


def _branch_error(g: OnnxGraph, tensor: str, idxs: list[int]) -> ModelFormatError:
    for i in idxs:  # an operator heinfer does not know is the first thing to say
        if g.nodes[i].op_type not in SUPPORTED:
            return _unsupported(g, i)
    users = ", ".join(g.label(g.nodes[i], i) for i in idxs)
    return ModelFormatError(f"{g.source}: tensor {tensor!r} feeds {len(idxs)} nodes ({users}): "
                            f"a branch. {BRANCH_HINT}")


def _region(g: OnnxGraph, start: str, done: set[int],
            linear: bool = False) -> tuple[list[int], str]:
    """Element-wise nodes from `start` up to the first tensor where all its paths join; with
    `linear`, layout and linear nodes up to where the chain meets another kind of node."""
    allowed = LINEAR if linear else ELEMENTWISE
    produced, region = {start}, []
    while True:
        cands = sorted(i for t in produced for i in g.consumers.get(t, [])
                       if i not in done and i not in region)
        if not cands:
            raise ModelFormatError(f"{g.source}: tensor {start!r}: element-wise paths that never "
                                   "join")
        i = cands[0]
        node = g.nodes[i]
        where = g.label(node, i)
        if node.op_type not in allowed:
            raise _branch_error(g, start, sorted(set(cands)))
        outside = [x for x in g.data_inputs(node) if x not in produced]
        if outside:
            raise ModelFormatError(f"{g.source}: {where} joins {sorted(outside)} with a tensor "
                                   f"computed from {start!r}: a residual connection. "
                                   f"{BRANCH_HINT}")
        region.append(i)
        produced.add(node.output[0])
        open_ = {t for t in produced if t in g.outputs
                 or any(c not in region and c not in done for c in g.consumers.get(t, []))}
        out = node.output[0]
        if open_ == {out} and linear and out not in g.outputs:
            nxt = [c for c in g.consumers.get(out, []) if c not in done]
            if nxt and all(g.nodes[c].op_type in LINEAR for c in nxt):
                continue
        if open_ == {out} or (not open_ and out in g.outputs):
            return region, out


def _append(layers: list[Layer], layer: Layer) -> None:
    """Append, merging consecutive affine maps (`x * 2 - 0.5` is one map, folded once) and
    dropping one that became the identity."""
    prev = layers[-1] if layers else None
    if not (layer.attrs.get("affine") and prev is not None and prev.attrs.get("affine")):
        layers.append(layer)
        return
    s1, b1 = np.asarray(prev.attrs["scale"]), np.asarray(prev.attrs["bias"])
    s2, b2 = np.asarray(layer.attrs["scale"]), np.asarray(layer.attrs["bias"])
    layers[-1] = affine_layer(prev.name, s1 * s2, b1 * s2 + b2)
    if np.allclose(s1 * s2, 1.0, rtol=0, atol=1e-7) and np.allclose(b1 * s2 + b2, 0.0, atol=1e-7):
        layers.pop()


def _walk(g: OnnxGraph) -> tuple[list[Layer], list[str], str]:
    layers: list[Layer] = []
    notes: list[str] = []
    cur, done, pad = g.input, set(), 0
    probe = np.zeros(g.input_shape)
    result = cur  # the tensor the model's output corresponds to
    while True:
        cons = [i for i in g.consumers.get(cur, []) if i not in done]
        if not cons:
            break
        i = cons[0]
        node = g.nodes[i]
        op, where = node.op_type, f"{g.source}: {g.label(node, i)}"
        name = node.name or f"{op.lower()}{i}"
        new: list[Layer] = []
        if op not in ELEMENTWISE and len(cons) > 1:
            raise _branch_error(g, cur, cons)
        if op in ELEMENTWISE:
            idxs, out = _region(g, cur, done)
            ev = g.evaluator([g.nodes[j] for j in idxs], cur, out)
            ops = "+".join(g.nodes[j].op_type for j in idxs)
            new = elementwise_layers(ev, probe.shape, name, f"{where} [{ops}]")
        elif op in MOVEMENT:
            idxs, out = _region(g, cur, done, linear=True)
            ev = g.evaluator([g.nodes[j] for j in idxs], cur, out)
            ops = "+".join(g.nodes[j].op_type for j in idxs)
            new, more = movement_layers(ev, probe.shape, name, f"{where} [{ops}]")
            notes += more
        elif op in FINAL:
            idxs, out = [i], node.output[0]
            if out not in g.outputs or g.consumers.get(out):
                raise ModelFormatError(f"{where}: only a final {op} is supported")
            notes.append(f"{g.label(node, i)}: the final {op} was dropped; the plan returns "
                         "logits (the predicted class, the argmax, is unchanged)")
        elif op == "Pad":
            idxs, out = [i], node.output[0]
            pad = _pad(g, node, where, probe)
        elif op == "Conv":
            idxs, out = [i], node.output[0]
            new, pad = [_conv(g, node, where, probe, pad)], 0
        elif op in ("Gemm", "MatMul"):
            idxs, out = [i], node.output[0]
            new = [_dense(g, node, where, probe)]
        elif op in ("MaxPool", "AveragePool"):
            idxs, out = [i], node.output[0]
            new = [_pool(node, where, probe)]
            if new[0].attrs == {"kernel": 1, "stride": 1}:  # adaptive pooling to the same size
                new = []
        elif op in ("Concat", "Sum"):
            raise ModelFormatError(f"{where} combines several computed tensors. {BRANCH_HINT}")
        else:
            raise _unsupported(g, i)
        done.update(idxs)
        for layer in new:
            probe = forward_layer(layer, probe)
            _append(layers, layer)
        if op not in FINAL:
            result = out
        cur = out
    if cur not in g.outputs or len(g.outputs) != 1:
        raise ModelFormatError(f"{g.source}: the chain ends at {cur!r}, but the graph's outputs "
                               f"are {g.outputs}; heinfer imports one chain to one output")
    return layers, notes, result


def _check(g: OnnxGraph, model: Model, result: str) -> float:
    """Largest difference to onnx's reference evaluator on one random input (relative)."""
    x = np.random.default_rng(0).uniform(-1, 1, size=g.input_shape)
    expected = g.run_to([result], x)[0].reshape(-1)
    got = model.forward(x).reshape(-1)
    if got.shape != expected.shape:
        raise ModelFormatError(f"{g.source}: imported model gives {got.shape} values, the ONNX "
                               f"graph {expected.shape}")
    err = float(np.abs(got - expected).max() / (1.0 + np.abs(expected).max()))
    if err > 1e-3:
        raise ModelFormatError(f"{g.source}: the imported model differs from onnx's reference "
                               f"evaluator by {err:.2e} (relative); please report this model")
    return err


def load_onnx(path: str | Path, name: str | None = None, check: bool = True) -> Model:
    """Import an ONNX CNN as a heinfer Model; `check` compares it with onnx's reference
    evaluator on a random input (disable for very large inputs, where that is slow)."""
    g = prepare(path)
    layers, notes, result = _walk(g)
    seen: dict[str, int] = {}
    for layer in layers:  # layer names key the weights: make them unique
        n = seen.get(layer.name, 0)
        seen[layer.name] = n + 1
        if n:
            layer.name = f"{layer.name}.{n}"
    model = Model(name or Path(path).stem, g.input_shape, layers,
                  metadata={"source": str(path), "imported_from": "onnx",
                            "import_notes": notes})
    if check:
        model.metadata["import_check_error"] = _check(g, model, result)
    return model
