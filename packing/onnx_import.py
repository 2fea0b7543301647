"""ONNX import: one table from operator name to importer, and a short loop.

PyTorch users export with `torch.onnx.export(net, torch.zeros(1, C, H, W), "model.onnx")`
(see docs/COMPILER.md). The graph must be a chain (each node consumes the previous node's output
plus initializers), which covers the sequential CNNs heinfer evaluates. Unsupported operators fail
naming the operator, the node and the supported operators.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer_packing.modelfile import Layer, Model

Importer = Callable[[Any, dict[str, np.ndarray], dict[str, Any], str], list[Layer]]


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _symmetric_pad(pads: list[int], node) -> int:
    if not pads:
        return 0
    if len(set(pads)) != 1:
        raise ModelFormatError(f"node {node.name!r} ({node.op_type}): asymmetric padding {pads} "
                               "is not supported")
    return int(pads[0])


def _conv(node, init, a, name) -> list[Layer]:
    w = init[node.input[1]]
    b = init[node.input[2]] if len(node.input) > 2 else None
    if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
        raise ModelFormatError(f"node {node.name!r} (Conv): groups and dilations are not "
                               "supported")
    strides = a.get("strides", [1, 1])
    if len(set(strides)) != 1:
        raise ModelFormatError(f"node {node.name!r} (Conv): unequal strides {strides}")
    return [Layer(name, "conv2d", {"stride": int(strides[0]),
                                   "padding": _symmetric_pad(a.get("pads", []), node)}, w, b)]


def _gemm(node, init, a, name) -> list[Layer]:
    w = init[node.input[1]] * a.get("alpha", 1.0)
    if a.get("transA", 0):
        raise ModelFormatError(f"node {node.name!r} (Gemm): transA is not supported")
    if not a.get("transB", 0):
        w = w.T
    b = init[node.input[2]] * a.get("beta", 1.0) if len(node.input) > 2 else None
    return [Layer(name, "dense", {}, w, b)]


def _matmul(node, init, a, name) -> list[Layer]:
    return [Layer(name, "dense", {}, init[node.input[1]].T, None)]


def _add(node, init, a, name) -> list[Layer]:
    # MatMul + Add: the caller merges the bias into the preceding dense layer
    return [Layer(name, "bias", {}, None, init[node.input[1]])]


def _pool(kind: str):
    def importer(node, init, a, name) -> list[Layer]:
        k = a["kernel_shape"]
        s = a.get("strides", k)
        if len(set(k)) != 1 or len(set(s)) != 1 or _symmetric_pad(a.get("pads", []), node):
            raise ModelFormatError(f"node {node.name!r} ({node.op_type}): only square, unpadded "
                                   "pooling is supported")
        return [Layer(name, kind, {"kernel": int(k[0]), "stride": int(s[0])})]
    return importer


def _global_avg(node, init, a, name) -> list[Layer]:
    return [Layer(name, "avgpool2d", {"kernel": -1, "stride": 1})]  # kernel set from shape


def _batchnorm(node, init, a, name) -> list[Layer]:
    scale, bias, mean, var = (init[i].tolist() for i in node.input[1:5])
    return [Layer(name, "batchnorm", {"scale": scale, "bias": bias, "mean": mean, "var": var,
                                      "eps": float(a.get("epsilon", 1e-5))})]


def _activation(fn: str):
    return lambda node, init, a, name: [Layer(name, "activation", {"fn": fn})]


def _square_mul(node, init, a, name) -> list[Layer]:
    if node.input[0] != node.input[1]:
        raise ModelFormatError(f"node {node.name!r} (Mul): only x*x (a square) is supported")
    return [Layer(name, "activation", {"fn": "square"})]


def _pow(node, init, a, name) -> list[Layer]:
    if float(np.asarray(init.get(node.input[1], np.nan))) != 2.0:
        raise ModelFormatError(f"node {node.name!r} (Pow): only exponent 2 is supported")
    return [Layer(name, "activation", {"fn": "square"})]


ONNX_IMPORTERS: dict[str, Importer] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add,
    "Relu": _activation("relu"),
    "Sigmoid": _activation("sigmoid"),
    "Tanh": _activation("tanh"),
    "MaxPool": _pool("maxpool2d"),
    "AveragePool": _pool("avgpool2d"),
    "GlobalAveragePool": _global_avg,
    "BatchNormalization": _batchnorm,
    "Flatten": lambda node, init, a, name: [Layer(name, "flatten")],
    "Reshape": lambda node, init, a, name: [Layer(name, "flatten")],
    "Dropout": lambda node, init, a, name: [Layer(name, "dropout")],
    "Identity": lambda node, init, a, name: [],
    "Mul": _square_mul,
    "Pow": _pow,
}


def _shape_after(layers: list[Layer], input_shape: tuple[int, ...]) -> tuple[int, ...]:
    from heinfer.reference import forward_layer

    x = np.zeros(input_shape)
    for layer in layers:
        x = forward_layer(layer, x)
    return x.shape


def load_onnx(path: str | Path, name: str | None = None) -> Model:
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf/OS errors of many types
        raise ModelFormatError(f"cannot read ONNX model {path}: {e}") from e
    graph = proto.graph
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ModelFormatError(f"{path}: expected one graph input, found {len(inputs)}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    input_shape = tuple(int(d) for d in dims[1:])  # drop the batch dimension
    # Constant nodes become initializers (Reshape shapes, Pow exponents)
    for node in graph.node:
        if node.op_type == "Constant":
            init[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
    layers: list[Layer] = []
    current = inputs[0].name
    for i, node in enumerate(n for n in graph.node if n.op_type != "Constant"):
        importer = ONNX_IMPORTERS.get(node.op_type)
        if importer is None:
            raise ModelFormatError(
                f"{path}: node {node.name or i!r} uses operator {node.op_type!r}, which heinfer "
                f"does not import; supported: {sorted(ONNX_IMPORTERS)}"
            )
        data_inputs = [x for x in node.input if x and x not in init]
        if data_inputs and data_inputs[0] != current:
            raise ModelFormatError(f"{path}: node {node.name or i!r} does not consume the previous "
                                   "node's output; only chains of layers are supported")
        new = importer(node, init, _attrs(node), node.name or f"{node.op_type.lower()}{i}")
        for layer in new:
            if layer.op == "bias":
                if not layers or layers[-1].op != "dense" or layers[-1].bias is not None:
                    raise ModelFormatError(f"node {node.name!r} (Add): only a bias after MatMul "
                                           "is supported")
                layers[-1].bias = layer.bias
                continue
            if layer.op == "avgpool2d" and layer.attrs["kernel"] == -1:
                _, h, w = _shape_after(layers, input_shape)
                layer.attrs = {"kernel": int(h), "stride": int(h)}
            layers.append(layer)
        current = node.output[0]
    return Model(name or Path(path).stem, input_shape, layers,
                 metadata={"source": str(path), "imported_from": "onnx"})
