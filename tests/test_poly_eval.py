"""Polynomial activations of any degree (`PolyEval`, plan op "poly") on real CKKS, on both
backends: against numpy with asserted bounds, depth = levels consumed, exact scales, operation
counts (expected = counted on the real run = symbolic), and lowered models end to end.

Parameters are small and insecure (n=4096, scale 2^30). Observed errors on the kernel alone are
1e-6..1e-4 for |x| <= 1.5 and coefficients of order 0.5 (key-switching noise of the products
dominates, growing with the degree); the bound 1e-3 leaves room for that and nothing more: a
wrong power, coefficient or scale gives errors of order 1 (or a scale-mismatch error).
"""

import numpy as np
import pytest

from heinfer import reference as ref
from heinfer.backends import PYFHEL_MISSING, backend_available, make_backend
from heinfer.backends.counting import CountingBackend
from heinfer.backends.symbolic import SymbolicBackend
from heinfer.codec import decrypt_decode, encode_encrypt
from heinfer.errors import DepthExhaustedError, ModelFormatError
from heinfer.kernels.base import BuildContext
from heinfer.kernels.poly import PolyEval, poly_depth
from heinfer.layout import VectorLayout
from heinfer.plan import CompiledPlan, Plan, PlanStep
from heinfer_packing.lower import fold_model, lower, plan_depth
from heinfer_packing.modelfile import Layer, Model
from heinfer_packing.report import report
from tests.conftest import run_encrypted, small_params

# the two-backend pattern of tests/test_backend_contract.py
BACKENDS = ["tenseal", pytest.param("pyfhel", marks=pytest.mark.skipif(
    not backend_available("pyfhel"), reason=PYFHEL_MISSING))]
SLOTS = 2048
POLY_BOUND = 1e-3      # kernel alone, relative to max(1, max |p(x)|)
MODEL_BOUND = 5e-3     # a lowered dense -> poly -> dense model (as tests/test_lowering.py)


def _coeffs(degree: int, seed: int = 0) -> list[float]:
    return list(np.random.default_rng(seed + degree).normal(scale=0.5, size=degree + 1))


def _run_steps(params, steps, x, backend_name, mask_output: bool = False):
    """Run plan steps on ciphertexts; return the decoded output, the output ciphertexts, the
    compiled plan and the op counts per kernel on the real backend. Unmasked by default (the
    kernels on their own); `mask_output` as served."""
    plan = Plan("t", params, tuple(x.shape), VectorLayout(x.size, params.slots), steps)
    be = make_backend(params, backend_name)
    compiled = CompiledPlan(plan, be, mask_output=mask_output)
    spec = compiled.spec
    be.generate_keys(spec.rotation_steps)
    cts = encode_encrypt(be, spec, x)
    counter = CountingBackend(be)
    counts = []
    for k in compiled.kernels:
        counter.reset()
        cts = k.run(counter, cts)
        counts.append(dict(counter.counts))
    return decrypt_decode(be, spec, cts), cts, compiled, counts


def _by_op(counts: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for (op, _level), n in counts.items():
        out[op] = out.get(op, 0) + n
    return out


def test_depth_is_floor_log2_plus_one():
    assert [poly_depth(_coeffs(d)) for d in range(1, 9)] == [1, 2, 2, 3, 3, 3, 3, 4]
    assert poly_depth([0.1, 0.2, 0.3, 0.4, 0.0, 0.0]) == 2  # trailing zeros do not count
    be = SymbolicBackend(small_params(6))
    for d in range(2, 16):
        k = PolyEval(BuildContext(be, encode_plaintexts=False), _coeffs(d),
                     VectorLayout(10, be.slots), 6, be.params.scale)
        assert k.in_level - k.out_level == poly_depth(_coeffs(d)) == (d).bit_length()
        assert k.in_level - k.out_level == plan_depth([PlanStep("poly", {"coeffs": _coeffs(d)})])
        assert k.in_level - k.out_level <= int(np.ceil(np.log2(d))) + 1


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("degree", [3, 4, 5, 7])
def test_poly_eval_matches_numpy(backend_name, degree):
    x = np.random.default_rng(7).uniform(-1.5, 1.5, size=40)
    coeffs = _coeffs(degree)
    depth = poly_depth(coeffs)
    params = small_params(depth)        # exactly the levels the kernel needs
    he, cts, compiled, counts = _run_steps(params, [PlanStep("poly", {"coeffs": coeffs})], x,
                                           backend_name)
    want = ref.poly(x, coeffs)
    err = np.abs(he - want).max()
    assert err < POLY_BOUND * max(1.0, np.abs(want).max()), f"degree {degree}: error {err}"
    k = compiled.kernels[0]
    be = compiled.backend
    assert k.out_level == be.level(cts[0]) == 0                # depth consumed = poly_depth
    assert be.scale_of(cts[0]) == k.out_scale                  # the declared scale, bit-exact
    assert abs(k.out_scale / k.in_scale - 1) < 1e-12           # activation keeps the scale
    counted = _by_op(counts[0])
    for op, n in k.expected_ops.items():
        assert counted.get(op, 0) == n, (op, counted)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_poly_eval_zeros_non_power_of_two_scale_and_scale_down(backend_name):
    """Zero coefficients (x^3, 0.5 + 0.2 x^4) and an input scale that is not a power of two
    (after a square: s^2/q): every term still meets at one scale, bit-exact as SEAL computes it;
    `scale_down_bits` lowers the output scale by that many bits for free."""
    x = np.random.default_rng(3).uniform(-1.0, 1.0, size=30)
    for coeffs, down in (([0.0, 0.0, 0.0, 1.0], 0), ([0.5, 0.0, 0.0, 0.0, 0.2], 3),
                         (_coeffs(6), 2)):
        steps = [PlanStep("square", {"constant": -0.3}),
                 PlanStep("poly", {"coeffs": coeffs, "scale_down_bits": down})]
        params = small_params(1 + poly_depth(coeffs))
        he, cts, compiled, _ = _run_steps(params, steps, x, backend_name)
        want = ref.poly(x**2 - 0.3, coeffs)
        assert np.abs(he - want).max() < POLY_BOUND * max(1.0, np.abs(want).max()), coeffs
        sq, k = compiled.kernels
        assert compiled.backend.scale_of(cts[0]) == k.out_scale
        assert abs(k.out_scale * 2**down / sq.out_scale - 1) < 1e-12


def test_poly_eval_without_enough_levels_is_refused():
    x = np.zeros(10)
    with pytest.raises(DepthExhaustedError, match="poly d5 needs 3 more rescale"):
        run_encrypted(small_params(2), VectorLayout(10, SLOTS),
                      [PlanStep("poly", {"coeffs": _coeffs(5)})], x)


# -- lowering -------------------------------------------------------------------------------
def dense_poly_dense(degree: int, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    return Model(f"dpd{degree}", (30,), [
        Layer("fc1", "dense", {}, rng.normal(scale=0.15, size=(20, 30)),
              rng.normal(scale=0.1, size=20)),
        Layer("act", "poly", {"coeffs": [0.1, 0.5, 0.25, 0.05, -0.02][: degree + 1]}),
        Layer("fc2", "dense", {}, rng.normal(scale=0.3, size=(5, 20)),
              rng.normal(scale=0.1, size=5)),
    ])


def test_fold_model_emits_poly_for_degree_above_two():
    steps, out_scale = fold_model(dense_poly_dense(4))
    assert [s.op for s in steps] == ["dense", "poly", "dense"]
    assert steps[1].attrs["coeffs"] == [0.1, 0.5, 0.25, 0.05, -0.02] and out_scale == 1.0
    # degree 2 keeps its cheaper folded square
    assert [s.op for s in fold_model(dense_poly_dense(2))[0]] == ["dense", "square", "dense"]
    # a degree-3 activation after average pooling takes the 1/k^2 in its coefficients
    pooled = Model("p", (1, 4, 4), [Layer("pool", "avgpool2d", {"kernel": 2, "stride": 2}),
                                    Layer("act", "poly", {"coeffs": [0.0, 1.0, 0.0, 1.0]}),
                                    Layer("flatten", "flatten"),
                                    Layer("fc", "dense", {}, np.ones((2, 4)), None)])
    steps, _ = fold_model(pooled)
    assert steps[1].op == "poly" and steps[1].attrs["coeffs"] == [0.0, 0.25, 0.0, 0.25**3]
    with pytest.raises(ModelFormatError, match="constant polynomial"):
        fold_model(Model("c", (4,), [Layer("act", "poly", {"coeffs": [1.0, 0.0, 0.0, 0.0]})]))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("degree", [3, 4])
def test_lowered_model_with_high_degree_poly_runs_encrypted(backend_name, degree):
    model = dense_poly_dense(degree)
    depth = plan_depth(fold_model(model)[0])
    assert depth == 2 + poly_depth(model.layers[1].attrs["coeffs"])
    plan = lower(model, small_params(depth))
    x = np.random.default_rng(1).normal(size=30)
    he, _, compiled, _ = _run_steps(plan.params, plan.steps, x, backend_name)
    expected = model.forward(x)
    err = np.abs(he * plan.output_scale - expected).max()
    assert err < MODEL_BOUND * max(1.0, np.abs(expected).max()), err
    # the depth plan_depth reports is what the run consumed: every level of the chain
    assert compiled.spec.depth == plan_depth(plan.steps) == plan.params.depth
    assert compiled.kernels[-1].out_level == 0


def test_default_parameters_lower_the_poly_output_scale_for_the_last_layer():
    """lower() choosing 128-bit parameters skips the last rescale; the room that layer needs is
    taken from the poly's own output scale (scale_down_bits), not from its input's."""
    model = dense_poly_dense(4)
    x = np.random.default_rng(2).normal(size=30)
    model.metadata["max_abs"] = {"fc2": float(np.abs(model.forward(x)).max()) * 2}
    plan = lower(model)
    assert plan.params.security_bits() == 128
    assert plan.steps[-1].attrs["rescale"] is False
    assert plan.steps[1].attrs.get("scale_down_bits", 0) > 0
    assert plan.params.depth == plan_depth(plan.steps) == 1 + 3
    he, _ = run_encrypted(plan.params, plan.input_layout, plan.steps, x)
    expected = model.forward(x)
    assert np.abs(he * plan.output_scale - expected).max() < MODEL_BOUND * max(
        1.0, np.abs(expected).max())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_symbolic_counts_equal_real_counts_with_poly(backend_name):
    """The compiler report's counts (symbolic backend) equal a real run's, per layer and level
    (the pattern of tests/test_report.py), and the report names the polynomial's degree."""
    model = dense_poly_dense(4)
    plan = lower(model, small_params(5))
    rep = report(plan)
    x = np.random.default_rng(4).normal(size=30)
    _, _, compiled, counts = _run_steps(plan.params, plan.steps, x, backend_name,
                                        mask_output=True)  # as the report counts
    for kernel, layer, real in zip(compiled.kernels, rep.layers, counts, strict=True):
        assert real == layer.ops, kernel.name
    poly = rep.layers[1]
    assert poly.name == "poly d4" and (poly.level_in, poly.level_out) == (4, 1)
    assert poly.count("square") == 2 and poly.count("multiply") == 1
    assert "poly d4" in rep.to_text()
