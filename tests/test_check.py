"""The plan check (heinfer.check): every plan is run and compared with plaintext before it is
written or served; overflow is found before any ciphertext exists; issue #11's sigmoid/tanh
model either compiles to a plan that agrees or is refused with what to change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heinfer.check import (
    CheckRecord,
    agreement_estimate,
    check_plan,
    checked,
    record_of,
    run_plain,
    verify_main,
)
from heinfer.errors import PlanCheckError
from heinfer.plan import Plan
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import Layer, Model
from tests.conftest import small_params
from tests.test_server_support import tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


def _inputs(model: Model, n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *model.input_shape))


def test_plain_backend_is_the_model_and_ckks_agrees():
    """PlainBackend runs the plan's own kernels in the clear: the model's numpy forward to
    rounding; the real CKKS run agrees within the bound and the record says so."""
    model = tiny_model()
    plan = lower(model, small_params(3), first_conv="rotation")
    xs = _inputs(model)
    outs, log = run_plain(plan, xs)
    for o, x in zip(outs, xs, strict=True):
        assert np.abs(o - model.forward(x)).max() < 1e-9
    assert log.worst().margin_bits > 5
    rec = check_plan(plan, xs, model.forward, method="ckks")
    assert rec.passed and rec.method == "ckks" and rec.inputs == 8, rec.summary()
    assert rec.agreement == 1.0 and rec.max_error < rec.error_bound
    assert 0 < rec.eval_ms < 1e4


def test_overflow_is_found_before_it_happens():
    """Activations far beyond what the primes hold: the range analysis names the step and the
    real run confirms the garbage the record warned about."""
    model = tiny_model()
    big = Model("big", model.input_shape, [
        Layer(la.name, la.op, dict(la.attrs),
              None if la.weight is None else la.weight * (3e4 if la.op == "conv2d" else 1.0),
              None if la.bias is None else la.bias * (3e4 if la.op == "conv2d" else 1.0))
        for la in model.layers], model.labels)
    plan = lower(big, small_params(3), first_conv="rotation")
    xs = _inputs(big)
    rec = check_plan(plan, xs, big.forward, method="modelled")
    assert not rec.passed
    assert any(r.startswith("overflow") for r in rec.reasons), rec.reasons
    assert rec.min_margin_bits < 1 and "step" in rec.margin_at
    real = check_plan(plan, xs, big.forward, method="ckks")
    assert real.max_error > real.error_bound  # the wrap the range analysis predicted
    with pytest.raises(PlanCheckError, match="overflow"):
        checked(plan, xs, big.forward, method="modelled")


def test_agreement_estimate():
    refs = np.array([[0.0, 10.0, 0.0], [0.0, 0.01, 0.0], [5.0, 5.0, 0.0]])
    assert agreement_estimate(refs, 0.0) == 1.0
    est = agreement_estimate(refs, 0.1)
    # the first input is safe, the second is close to a three-way coin toss; the tie counts
    # as kept (both tops are the reference's argmax candidates)
    assert 0.6 < est < 0.8
    assert agreement_estimate(refs, 1e-4) > agreement_estimate(refs, 0.1)


@pytest.fixture
def old_square_fold(monkeypatch):
    """Lowering as in issue #11: every fitted quadratic folded into a square, however far its
    shift (the lowering now runs nearly linear fits as poly2; the check must catch the old
    silent error whatever the lowering does)."""
    from heinfer_packing import lower as lowering

    monkeypatch.setattr(lowering, "SHIFT_LIMIT", float("inf"))


def test_sigtanh_default_compile_agrees(tmp_path, capsys):
    """Issue #11's model with today's lowering: the default plan passes its check as is."""
    from heinfer_packing.cli import main as compile_main

    out = tmp_path / "sigtanh"
    code = compile_main([str(FIXTURES / "sigtanh.onnx"), "--calib-fmnist", "200", "--check",
                         "modelled", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "retried" not in text, text
    rec = record_of(Plan.load(f"{out}.plan.json"))
    assert rec.passed and rec.predicted_agreement >= 0.99 and rec.max_error < 0.05


def test_sigtanh_default_compile_retries_to_a_plan_that_agrees(tmp_path, capsys,
                                                               old_square_fold):
    """Issue #11: a PyTorch CNN with sigmoid and tanh (tests/fixtures/make_sigtanh.py), compiled
    with default options, decrypted to wrong logits without a word. With that lowering the check
    fails, the compiler (free to choose the precision) retries with safer settings, and the plan
    it writes carries the passed record; a real run of that plan agrees. (The modelled check
    keeps this test fast; the real one is exercised above and by heinfer verify below.)"""
    from heinfer_packing.cli import main as compile_main

    out = tmp_path / "sigtanh"
    code = compile_main([str(FIXTURES / "sigtanh.onnx"), "--calib-fmnist", "200", "--check",
                         "modelled", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "FAILED" in text and "retried with --precise" in text
    plan = Plan.load(f"{out}.plan.json")
    rec = record_of(plan)
    assert rec is not None and rec.passed and rec.predicted_agreement >= 0.99
    assert rec.agreement_inputs == 200
    assert plan.steps[-1].attrs.get("rescale", True)  # --precise was chosen
    from heinfer_models import fashion_mnist

    images, _ = fashion_mnist.load("test")
    np.savez(tmp_path / "x.npz", x=fashion_mnist.normalize(images[:8]))
    code = verify_main([f"{out}.plan.json", "--inputs", str(tmp_path / "x.npz")])
    text = capsys.readouterr().out
    assert code == 0 and "real CKKS run, 8 inputs" in text and "top-1 agreement 100.0%" in text


def test_sigtanh_pinned_precision_is_refused_with_what_to_change(tmp_path, capsys,
                                                                 old_square_fold):
    """With the precision fixed by the user (--scale-bits) the compiler does not override it:
    nothing is written, and the error names the setting that passes."""
    from heinfer_packing.cli import main as compile_main

    out = tmp_path / "pinned"
    code = compile_main([str(FIXTURES / "sigtanh.onnx"), "--calib-fmnist", "200",
                         "--scale-bits", "29", "--check", "modelled", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "fails its check, nothing written" in err and "recompile with --precise" in err
    assert not Path(f"{out}.plan.json").exists()


def test_verify_records_a_check_for_an_old_plan(tmp_path, capsys):
    """The migration for plans compiled before checks existed: `heinfer verify --record`."""
    from heinfer_client.cli import main as cli

    model = tiny_model()
    path = lower(model, small_params(3), first_conv="rotation").save(tmp_path / "old")
    np.savez(tmp_path / "in.npz", x=_inputs(model), y=np.zeros(8, dtype=int))
    code = cli(["verify", str(path), "--inputs", str(tmp_path / "in.npz"), "--record"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "carries no check record" in out and "plaintext accuracy" in out
    rec = record_of(Plan.load(path))
    assert rec is not None and rec.passed and rec.method == "ckks"
    assert "PlainBackend" in rec.reference
    # bad inputs: one clear line, exit code 2
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2, 2)))
    assert cli(["verify", str(path), "--inputs", str(tmp_path / "bad.npz")]) == 2
    assert "takes (N, 1, 6, 6)" in capsys.readouterr().err
    assert cli(["verify", str(path), "--inputs", str(tmp_path / "missing.npz")]) == 2


def test_record_round_trips_in_the_plan_file(tmp_path):
    model = tiny_model()
    plan = checked(lower(model, small_params(3), first_conv="rotation"), _inputs(model),
                   model.forward)
    doc = json.loads(plan.save(tmp_path / "p").read_text())
    rec = CheckRecord.model_validate(doc["metadata"]["check"])
    assert rec.passed and Plan.load(tmp_path / "p.plan.json").hash() == doc["hash"]


def test_objective_only_retries_too(tmp_path, capsys, old_square_fold):
    """`--objective` without --precise/--scale-bits leaves the precision to the compiler: the
    chosen candidate fails its check and a safer one is written, with both checks reported."""
    from heinfer_packing.cli import main as compile_main

    out = tmp_path / "objective"
    code = compile_main([str(FIXTURES / "sigtanh.onnx"), "--calib-fmnist", "200", "--objective",
                         "latency", "--check", "modelled", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "candidates, objective latency" in text and "retried with --precise" in text
    rec = record_of(Plan.load(f"{out}.plan.json"))
    assert rec is not None and rec.passed


def test_compile_torch_checks_its_plan():
    """The library path from PyTorch returns a checked plan too (the record in its metadata)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")  # torch's exporter (the onnx extra)
    from heinfer_models import fashion_mnist
    from heinfer_packing import compile_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 7, stride=3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 10)).eval()
    images, _ = fashion_mnist.load("train")
    plan = compile_torch(net, torch.zeros(1, 1, 28, 28),
                         calibration=fashion_mnist.normalize(images[:64]), check="modelled")
    rec = record_of(plan)
    assert rec is not None and rec.passed and rec.method == "modelled"
