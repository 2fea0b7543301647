"""Throughput mode (batch in slots): the same plan's function, one image per slot, real CKKS."""

import numpy as np

from heinfer.backends import make_backend
from heinfer.codec import decrypt_decode_batch, encode_encrypt_batch
from heinfer.plan import CompiledPlan
from heinfer_packing.lower import lower
from heinfer_packing.report import report
from tests.conftest import small_params
from tests.test_lowering import small_cnn


def test_batch_plan_matches_the_model_per_image(rng):
    model = small_cnn(rng)
    plan = lower(model, small_params(5), batch=True)
    be = make_backend(plan.params)
    spec = plan.spec(be)
    assert spec.rotation_steps == []  # no Galois keys at all in throughput mode
    be.generate_keys([])
    compiled = CompiledPlan(plan, be)
    xs = rng.normal(size=(6, 1, 12, 12))
    cts = [be.ciphertext_from_bytes(b) for b in encode_encrypt_batch(be, spec, xs)]
    assert len(cts) == 144
    out = decrypt_decode_batch(be, spec, compiled.run(cts), len(xs))
    expected = np.stack([model.forward(x) for x in xs])
    assert out.shape == (6, 10)
    assert np.abs(out - expected).max() < 5e-3 * max(1.0, np.abs(expected).max())


def test_batch_report_counts_scalar_multiplies(rng):
    model = small_cnn(rng)
    rep = report(lower(model, small_params(5), batch=True))
    conv1 = rep.layers[0]
    # 3 output channels x 12x12 positions x 9 taps, minus the zero-padded taps at the border
    assert conv1.count("multiply_plain") == 3 * (12 * 12 * 9 - 4 * 12 * 3 + 4)
    assert sum(layer.count("rotate") for layer in rep.layers) == 0
