"""ONNX import (checked against onnx's own reference evaluator) and HE-friendly rewrites."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from heinfer.errors import ModelFormatError  # noqa: E402
from heinfer_packing.lower import lower  # noqa: E402
from heinfer_packing.onnx_import import load_onnx  # noqa: E402
from heinfer_packing.rewrites import format_records, rewrite  # noqa: E402
from tests.conftest import run_encrypted, small_params  # noqa: E402


def _cnn_onnx(path, rng, extra_node=None):
    """conv(bn) -> relu -> maxpool -> flatten -> gemm -> dropout -> gemm -> gemm."""
    t = lambda name, a: numpy_helper.from_array(a.astype(np.float32), name)  # noqa: E731
    inits = [
        t("w1", rng.normal(0, 0.4, (3, 1, 3, 3))), t("b1", rng.normal(0, 0.1, 3)),
        t("g", rng.uniform(0.5, 1.5, 3)), t("beta", rng.normal(0, 0.1, 3)),
        t("mu", rng.normal(0, 0.1, 3)), t("var", rng.uniform(0.5, 1.5, 3)),
        t("w2", rng.normal(0, 0.2, (12, 3 * 4 * 4))), t("b2", rng.normal(0, 0.1, 12)),
        t("w3", rng.normal(0, 0.3, (8, 12))), t("b3", rng.normal(0, 0.1, 8)),
        t("w4", rng.normal(0, 0.3, (4, 8))), t("b4", rng.normal(0, 0.1, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mu", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["d1"], transB=1),
        helper.make_node("Mul", ["d1", "d1"], ["sq"]),
        helper.make_node("Dropout", ["sq"], ["dr"]),
        helper.make_node("Gemm", ["dr", "w3", "b3"], ["d2"], transB=1),
        helper.make_node("Gemm", ["d2", "w4", "b4"], ["y"], transB=1),
    ]
    if extra_node is not None:
        nodes.append(extra_node)
    out_name = nodes[-1].output[0]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return model


def test_import_matches_onnx_reference(tmp_path, rng):
    proto = _cnn_onnx(tmp_path / "m.onnx", rng)
    model = load_onnx(tmp_path / "m.onnx")
    # onnxscript's optimizer folds the BatchNorm into the Conv and removes the Dropout
    assert [layer.op for layer in model.layers] == [
        "conv2d", "activation", "maxpool2d", "flatten", "dense", "activation", "dense", "dense"]
    assert model.metadata["import_check_error"] < 1e-6
    ref = ReferenceEvaluator(proto)
    for _ in range(3):
        x = rng.normal(size=(1, 8, 8))
        expected = ref.run(None, {"x": x[None].astype(np.float32)})[0][0]
        np.testing.assert_allclose(model.forward(x), expected, rtol=1e-4, atol=1e-4)


def test_unsupported_operator_is_named(tmp_path, rng):
    _cnn_onnx(tmp_path / "m.onnx", rng, helper.make_node("Hardmax", ["y"], ["z"], name="hard"))
    with pytest.raises(ModelFormatError,
                       match="'hard' \\(Hardmax\\): operator 'Hardmax'.*supported"):
        load_onnx(tmp_path / "m.onnx")


def test_exact_rewrites_keep_the_function(tmp_path, rng):
    from heinfer_packing.rewrites import fold_batchnorm, merge_dense, remove_dropout

    _cnn_onnx(tmp_path / "m.onnx", rng)
    model = load_onnx(tmp_path / "m.onnx")
    folded = model
    for p in (remove_dropout, fold_batchnorm, merge_dense):
        folded, _, exact = p(folded)
        assert exact
    assert len(folded.layers) == len(model.layers) - 1  # the last two Gemms merged
    x = rng.normal(size=(1, 8, 8))
    np.testing.assert_allclose(folded.forward(x), model.forward(x), rtol=1e-10, atol=1e-10)


def test_rewrites_then_encrypted(tmp_path, rng):
    _cnn_onnx(tmp_path / "m.onnx", rng)
    model = load_onnx(tmp_path / "m.onnx")
    calib = rng.normal(size=(64, 1, 8, 8))
    labels = np.array([int(np.argmax(model.forward(x))) for x in calib])
    he_model, records = rewrite(model, calib, labels, degree=2)
    names = {r.name: r for r in records}
    assert names["fold_batchnorm"].exact
    assert len(names["merge_dense"].changes) == 1
    assert not names["fit_activations"].exact and not names["maxpool_to_avgpool"].exact
    assert names["original"].accuracy == 1.0
    assert "fit_activations" in format_records(records)
    ops = [layer.op for layer in he_model.layers]
    assert ops == ["conv2d", "poly", "avgpool2d", "flatten", "dense", "poly", "dense"]
    plan = lower(he_model, small_params(5))
    x = calib[0]
    he, _ = run_encrypted(plan.params, plan.input_layout, plan.steps, x)
    expected = he_model.forward(x)
    assert np.abs(he * plan.output_scale - expected).max() < 5e-3 * max(1, np.abs(expected).max())
