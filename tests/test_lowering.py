"""Model -> plan lowering: the folded plan computes the model's function, encrypted and in clear."""

import numpy as np
import pytest

from heinfer.errors import DepthExhaustedError, ModelFormatError, PlanVersionError
from heinfer.plan import Plan
from heinfer_packing.lower import choose_params, fold_model, lower, plan_depth
from heinfer_packing.modelfile import Layer, Model, load_model, save_model
from tests.conftest import run_encrypted, small_params


def small_cnn(rng) -> Model:
    return Model("small-cnn", (1, 12, 12), [
        Layer("conv1", "conv2d", {"stride": 1, "padding": 1}, rng.normal(0, 0.3, (3, 1, 3, 3)),
              rng.normal(0, 0.1, 3)),
        Layer("act1", "poly", {"coeffs": [0.1, 0.5, 0.2]}),
        Layer("pool1", "avgpool2d", {"kernel": 2, "stride": 2}),
        Layer("conv2", "conv2d", {"stride": 1, "padding": 1}, rng.normal(0, 0.3, (4, 3, 3, 3)),
              rng.normal(0, 0.1, 4)),
        Layer("act2", "poly", {"coeffs": [0.0, 0.3, -0.1]}),
        Layer("flatten", "flatten"),
        Layer("fc1", "dense", {}, rng.normal(0, 0.1, (10, 4 * 6 * 6)), rng.normal(0, 0.1, 10)),
    ], labels=[str(i) for i in range(10)])


def folded_forward(steps, out_scale, x):
    """Evaluate folded plan steps in clear (checks the folding algebra without HE)."""
    from heinfer import reference as ref

    for s in steps:
        if s.op in ("conv2d", "conv2d_im2col"):
            x = ref.conv2d(x, s.weight, s.bias, s.attrs.get("stride", 1), s.attrs.get("padding", 0))
        elif s.op == "dense":
            x = s.weight @ x.reshape(-1) + (0 if s.bias is None else s.bias)
        elif s.op == "sumpool2d":
            x = ref.avgpool2d(x, s.attrs["kernel"], s.attrs["stride"]) * s.attrs["kernel"] ** 2
        elif s.op == "square":
            x = x**2 + s.attrs.get("constant", 0.0)
        elif s.op == "poly2":
            x = ref.poly(x, s.attrs["coeffs"])
    return x * out_scale


def test_folding_is_exact(rng):
    model = small_cnn(rng)
    steps, out_scale = fold_model(model)
    assert [s.op for s in steps] == ["conv2d", "square", "sumpool2d", "conv2d", "square",
                                     "flatten", "dense"]
    for _ in range(3):
        x = rng.normal(size=(1, 12, 12))
        np.testing.assert_allclose(folded_forward(steps, out_scale, x), model.forward(x),
                                   rtol=1e-9, atol=1e-9)


def test_activation_without_preceding_linear_uses_generic_poly(rng):
    model = Model("p", (8,), [Layer("act", "poly", {"coeffs": [0.1, 0.2, 0.3]}),
                              Layer("fc", "dense", {}, rng.normal(size=(3, 8)), None)])
    steps, _ = fold_model(model)
    assert steps[0].op == "poly2"


@pytest.mark.parametrize("first_conv", ["im2col", "rotation"])
def test_lowered_cnn_runs_encrypted(rng, first_conv):
    model = small_cnn(rng)
    plan = lower(model, small_params(5), first_conv=first_conv)
    assert plan_depth(plan.steps) == 5
    x = rng.normal(size=(1, 12, 12))
    he, _ = run_encrypted(plan.params, plan.input_layout, plan.steps, x)
    expected = model.forward(x)
    assert np.abs(he * plan.output_scale - expected).max() < 5e-3 * max(1, np.abs(expected).max())


def test_plan_too_deep_for_params(rng):
    with pytest.raises(DepthExhaustedError, match="needs depth 5"):
        lower(small_cnn(rng), small_params(4))


def test_choose_params_is_128_bit_and_deep_enough():
    p = choose_params(5)
    assert p.poly_modulus_degree == 8192 and p.depth == 5 and p.security_bits() == 128
    assert choose_params(9).poly_modulus_degree == 16384


def test_plan_file_roundtrip_and_hash(rng, tmp_path):
    plan = lower(small_cnn(rng), small_params(5))
    path = plan.save(tmp_path / "small")
    loaded = Plan.load(path)
    assert loaded.hash() == plan.hash()
    assert loaded.spec().rotation_steps == plan.spec().rotation_steps
    doc = path.read_text().replace('"plan_format": 1', '"plan_format": 99')
    path.write_text(doc)
    with pytest.raises(PlanVersionError, match="recompile"):
        Plan.load(path)


def test_model_file_roundtrip(rng, tmp_path):
    model = small_cnn(rng)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    x = rng.normal(size=(1, 12, 12))
    np.testing.assert_array_equal(again.forward(x), model.forward(x))
    bad = (tmp_path / "m" / "model.json").read_text().replace('"dense"', '"lstm"')
    (tmp_path / "m" / "model.json").write_text(bad)
    with pytest.raises(ModelFormatError, match="unsupported op 'lstm'"):
        load_model(tmp_path / "m")


def test_default_lowering_skips_the_final_rescale(rng):
    from heinfer.backends.symbolic import SymbolicBackend

    model = small_cnn(rng)
    model.metadata["max_abs"] = {"fc1": 4.0}
    plan = lower(model)  # parameters chosen here: the last dense keeps its product unrescaled
    assert plan.steps[-1].attrs["rescale"] is False
    assert plan.params.depth == plan_depth(plan.steps) == 4
    kernels = plan.build_kernels(SymbolicBackend(plan.params), encode=False)
    assert kernels[-1].out_level == kernels[-1].in_level == 0


def test_bad_files_and_options_give_clear_errors(rng, tmp_path, capsys):
    from heinfer_packing import cli
    from heinfer_packing.conformal import load_conformal

    save_model(small_cnn(rng), tmp_path / "m")
    (tmp_path / "m" / "weights.npz").write_bytes(b"not an npz")
    with pytest.raises(ModelFormatError, match="cannot read weights"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{broken")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(tmp_path / "m")
    plan = lower(small_cnn(rng), small_params(5))
    path = plan.save(tmp_path / "p")
    (tmp_path / "p.plan.npz").unlink()
    with pytest.raises(ModelFormatError, match="cannot read weights"):
        Plan.load(path)
    with pytest.raises(ModelFormatError, match="no conformal.json"):
        load_conformal(tmp_path)
    with pytest.raises(ModelFormatError, match="first_conv 'bogus'"):
        lower(small_cnn(rng), small_params(5), first_conv="bogus")
    assert cli.main(["no-such-model"]) == 2
    assert "heinfer-compile: error: no model 'no-such-model'" in capsys.readouterr().err


def test_unreadable_onnx_is_a_clear_error(tmp_path):
    pytest.importorskip("onnx")
    from heinfer_packing.onnx_import import load_onnx

    (tmp_path / "x.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFormatError, match="cannot read ONNX model"):
        load_onnx(tmp_path / "x.onnx")


@pytest.mark.parametrize("first_conv", ["im2col", "rotation"])
def test_compaction_after_a_sparse_pool_is_exact_and_priced(rng, first_conv):
    """conv -> pool leaves 6x6 maps at stride 2 (5% of the slots): `compact=True` converts them
    to dense blocks before conv2 (one more level); `compact=None` prices both and records it."""
    model = small_cnn(rng)
    plan = lower(model, small_params(6), first_conv=first_conv, compact=True)
    assert [s.op for s in plan.steps].count("compact") == 1
    assert plan_depth(plan.steps) == 6
    x = rng.normal(size=(1, 12, 12))
    he, compiled = run_encrypted(plan.params, plan.input_layout, plan.steps, x)
    expected = model.forward(x)
    assert np.abs(he * plan.output_scale - expected).max() < 5e-3 * max(1, np.abs(expected).max())
    conv2 = compiled.kernels[[s.op for s in plan.steps].index("compact") + 1]
    assert conv2.in_layout.block == 64  # 6x6 in blocks of next_pow2(36): cyclic diagonals
    auto = lower(model, first_conv=first_conv, compact=None)
    info = auto.metadata["compact"]
    assert info["points"] == [2]
    prices = info["prices"]
    assert set(prices) == {"no compaction", "compact, channel blocks",
                           "compact, interleaved channels"}
    assert info["chosen"] == min(prices, key=prices.get)
    assert ("compact" in [s.op for s in auto.steps]) == (info["chosen"] != "no compaction")


@pytest.mark.parametrize("first_conv", ["im2col", "rotation"])
def test_interleaved_channels_after_compaction_are_exact(rng, first_conv):
    """Compaction to interleaved channels (HWC: channel c at column offset c): the convolution
    after it keeps the interleave (no copies, non-cyclic diagonals) and stays exact."""
    model = small_cnn(rng)
    plan = lower(model, small_params(6), first_conv=first_conv, compact="interleaved")
    assert plan.steps[3].op == "compact" and plan.steps[3].attrs["interleaved"]
    x = rng.normal(size=(1, 12, 12))
    he, compiled = run_encrypted(plan.params, plan.input_layout, plan.steps, x)
    expected = model.forward(x)
    assert np.abs(he * plan.output_scale - expected).max() < 5e-3 * max(1, np.abs(expected).max())
    compact, conv2 = compiled.kernels[3], compiled.kernels[4]
    assert compact.out_layout.block == 1 and compact.out_layout.col_stride == 3  # 3 channels
    assert conv2.out_layout.block == 1 and conv2.out_layout.replicas == 1


def test_new_options_refuse_bad_values_clearly(rng, capsys):
    """scale bits, compaction mode, an image too large for a model, a first layer wider than
    the slots per output channel, a layout conversion of a non-grid: one clear error each."""
    from heinfer.errors import LayoutError
    from heinfer.kernels.base import BuildContext
    from heinfer.kernels.relayout import Compact
    from heinfer.layout import VectorLayout
    from heinfer_models import fashion_mnist
    from heinfer_packing import cli

    model = small_cnn(rng)
    for bits in (0, 12, 61):
        with pytest.raises(ModelFormatError, match=f"scale_bits {bits}: choose 20..60"):
            lower(model, scale_bits=bits)
    assert cli.main(["fmnist-cryptonets", "--scale-bits", "0"]) == 2
    assert "scale_bits 0" in capsys.readouterr().err
    with pytest.raises(ModelFormatError, match="compact 'always'"):
        lower(model, compact="always")
    with pytest.raises(ValueError, match=r"cannot fit \(28, 28\) images into \(1, 16, 16\)"):
        fashion_mnist.normalize(np.zeros((1, 28, 28), np.uint8), (1, 16, 16))
    wide = Model("wide", (1, 200, 200), [
        Layer("conv1", "conv2d", {"stride": 1, "padding": 1}, rng.normal(size=(2, 1, 3, 3)),
              None),
        Layer("flatten", "flatten"), Layer("fc", "dense", {}, rng.normal(size=(2, 80000)), None)])
    with pytest.raises(ModelFormatError, match="exceeds 4096 slots"):
        lower(wide, small_params(2, n=8192))
    from heinfer.backends.symbolic import SymbolicBackend

    params = small_params(1)
    with pytest.raises(LayoutError, match="compact needs a grid layout"):
        Compact(BuildContext(SymbolicBackend(params)), VectorLayout(10, params.slots),
                params.depth, params.scale)
