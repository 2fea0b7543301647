"""An ONNX graph made ready for import, and sub-graph evaluation.

Constant folding is onnxscript's optimizer (what torch's own exporter runs; it folds with onnx's
reference implementations and onnx's shape inference, so `Shape`-derived Reshape targets fold)
after fixing a symbolic batch dimension to 1: nothing is folded by hand. The importer then
tracks the running shape by passing a zero probe through the imported layers. It identifies
activations and layout changes by *evaluating* the sub-graph that computes them with onnx's
`ReferenceEvaluator`, so a GELU written as `x * 0.5 * (1 + erf(x / sqrt 2))` in any order, or an
adaptive pooling decomposed into Transpose/GatherND/ReduceMean, is recognised by what it
computes, not by its spelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError


def _fix_batch(proto) -> None:
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = 1


class OnnxGraph:
    """Folded ONNX model: constants by name, producers and consumers of every tensor."""

    def __init__(self, proto: Any, source: str) -> None:
        from onnx import numpy_helper

        self.proto, self.source = proto, source
        g = proto.graph
        self.raw: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.nodes = []
        for node in g.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.raw[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            else:
                self.nodes.append(node)
        self.consts = {k: np.asarray(v, dtype=np.float64) if v.dtype.kind == "f" else v
                       for k, v in self.raw.items()}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                if name and name not in self.raw:
                    self.consumers.setdefault(name, []).append(i)
        self.outputs = [o.name for o in g.output]
        inputs = [i for i in g.input if i.name not in self.raw]
        if len(inputs) != 1:
            raise ModelFormatError(f"{source}: expected one graph input, found {len(inputs)}")
        self.input = inputs[0].name
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        if not dims or any(d <= 0 for d in dims[1:]):
            raise ModelFormatError(f"{source}: the input {self.input!r} needs a fixed shape "
                                   f"(batch, C, H, W); found {dims}")
        self.input_shape = tuple(int(d) for d in dims[1:])

    def data_inputs(self, node) -> list[str]:
        return [x for x in node.input if x and x not in self.raw]

    def label(self, node, index: int | None = None) -> str:
        return f"node {node.name or index!r} ({node.op_type})"

    def evaluator(self, nodes: list, inp: str, out: str):
        """onnx's reference evaluator for `nodes` as a model from tensor `inp` to `out`."""
        from onnx import TensorProto, helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        used = {x for n in nodes for x in n.input if x in self.raw}
        graph = helper.make_graph(
            list(nodes), "sub", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            [numpy_helper.from_array(self.raw[x], x) for x in sorted(used)])
        model = helper.make_model(graph, opset_imports=list(self.proto.opset_import))
        model.ir_version = self.proto.ir_version
        ev = ReferenceEvaluator(model)
        return lambda x: np.asarray(ev.run(None, {inp: np.asarray(x, np.float32)})[0],
                                    dtype=np.float64)

    def run_to(self, names: list[str], x: np.ndarray) -> list[np.ndarray]:
        """The whole model's tensors `names` for input x (batch of one): the import check."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, 0, None) for n in names)
        out = ReferenceEvaluator(model).run(None, {self.input: np.asarray(x[None], np.float32)})
        return [np.asarray(o, dtype=np.float64)[0] for o in out]


def prepare(path: str | Path) -> OnnxGraph:
    """Read and fold constants (onnxscript's optimizer, with onnx's shape inference)."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf/OS errors of many types
        raise ModelFormatError(f"cannot read ONNX model {path}: {e}") from e
    _fix_batch(proto)
    try:
        import onnxscript.optimizer

        proto = onnxscript.optimizer.optimize(proto, onnx_shape_inference=True)
    except ImportError as e:
        raise ModelFormatError("ONNX import needs onnx and onnxscript: "
                               "pip install 'heinfer[onnx]'") from e
    except Exception as e:  # noqa: BLE001 - a malformed graph fails inside the optimizer
        raise ModelFormatError(f"{path}: onnx could not fold or infer shapes: {e}") from e
    return OnnxGraph(proto, str(path))
