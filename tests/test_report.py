"""The compiler's report: symbolic op counts equal the real CKKS run's, per layer and level."""


from heinfer.backends import make_backend
from heinfer.backends.counting import CountingBackend
from heinfer.codec import encode_encrypt
from heinfer.plan import CompiledPlan
from heinfer_packing.lower import lower
from heinfer_packing.report import predicted_ms, report
from tests.conftest import small_params
from tests.test_lowering import small_cnn


def test_symbolic_counts_equal_real_counts(rng):
    plan = lower(small_cnn(rng), small_params(5))
    rep = report(plan)
    be = make_backend(plan.params)
    spec = plan.spec(be)
    be.generate_keys(spec.rotation_steps)
    compiled = CompiledPlan(plan, be)
    cts = encode_encrypt(be, spec, rng.normal(size=(1, 12, 12)))
    counter = CountingBackend(be)
    for kernel, layer in zip(compiled.kernels, rep.layers, strict=True):
        counter.reset()
        cts = kernel.run(counter, cts)
        assert dict(counter.counts) == layer.ops, kernel.name
    assert rep.rotation_steps == spec.rotation_steps


def test_report_text_and_prediction(rng):
    plan = lower(small_cnn(rng), small_params(5))
    fake_calibration = {
        "ms": {"rotate": {str(lv): 2.0 for lv in range(6)},
               "multiply_plain": {str(lv): 0.5 for lv in range(6)}},
        "sizes": {"relin_key_bytes": 1000, "galois_key_bytes": 100,
                  "seeded_ciphertext_bytes": 10},
        "date": "today",
    }
    rep = report(plan, fake_calibration)
    rot = sum(layer.count("rotate") for layer in rep.layers)
    mp = sum(layer.count("multiply_plain") for layer in rep.layers)
    assert abs(rep.predicted_ms - (2.0 * rot + 0.5 * mp)) < 1e-9
    assert rep.key_bytes() == 1000 + 100 * len(rep.rotation_steps)
    text = rep.to_text()
    assert "conv2d_im2col" in text and "predicted latency" in text
    assert predicted_ms({("rotate", 3): 2}, fake_calibration) == 4.0


def test_lower_bound_counts_macs_and_reductions(rng):
    import math

    plan = lower(small_cnn(rng), small_params(5))
    cal = {"ms": {"rotate": {str(lv): 2.0 for lv in range(6)},
                  "multiply_plain": {str(lv): 0.5 for lv in range(6)}},
           "sizes": {"relin_key_bytes": 1, "galois_key_bytes": 1, "seeded_ciphertext_bytes": 1},
           "date": "today"}
    rep = report(plan, cal)
    # small_cnn: conv 1->3 3x3 on 12x12, conv 3->4 3x3 on 6x6, dense 144->10
    macs = [3 * 12 * 12 * 9, 4 * 6 * 6 * 27, 10 * 144]
    widths = [9, 27, 144]
    slots = plan.params.slots
    expected = sum(m / slots * 0.5 + math.log2(w) * 2.0 for m, w in zip(macs, widths, strict=True))
    assert abs(rep.lower_bound_ms() - expected) < 1e-9
    assert rep.predicted_ms >= rep.lower_bound_ms()
