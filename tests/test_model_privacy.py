"""Model privacy (issue 17): the client decrypts the answer and noise, nothing else.

The curious client (`heinfer_models.curious`) decrypts every slot of every output ciphertext
of the zoo models at their real 128-bit parameters, on real Fashion-MNIST test images.

The noise bound is derived per output ciphertext, not chosen (`Probe.noise_bound`): every slot
of a ciphertext decodes the same noise polynomial, so a slot holding nothing but noise has the
spread of the answer slots' own deviation from numpy; a one-in-a-million Gaussian tail over the
slots, with sigma at its one-in-a-million upper confidence limit. Masking off, the same check
fails by orders of magnitude (replicas of the logits: tested, so the check can fail).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from heinfer.backends.symbolic import SymbolicBackend
from heinfer_models import zoo
from heinfer_models.curious import probe, zoo_plan

# real CKKS at 128-bit parameters; in CI four n=8192 models (a sparse slot layout, a dense
# vector, a dense grid and the conformal kernel's two outputs: the test budget), every other
# (up to n=32768: a minute per image and GBs) with HEINFER_SLOW=1; the symbolic check below
# covers every model's structure in CI
CI_MODELS = ["fmnist-cryptonets", "fmnist-tenseal-tutorial", "fmnist-polyconv-1",
             "fmnist-conformal-1"]
SLOW_MODELS = [m for m in zoo.names() if m not in CI_MODELS]


def check_masked(name: str, n_images: int = 2):
    model, plan, xs = zoo_plan(name)
    p = probe(plan, model, xs[:n_images])
    # the answer itself: within the plans' logit error bound (tests/test_end_to_end.py)
    assert p.max_answer_err < 6e-2, (name, p.max_answer_err)
    for ct, (largest, bound) in p.within_noise().items():
        assert largest <= bound, (name, ct, largest, bound)
    return p


@pytest.mark.parametrize("name", CI_MODELS)
def test_only_the_answer_leaves_the_server(name):
    check_masked(name)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HEINFER_SLOW") != "1", reason="HEINFER_SLOW=1 runs it")
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_only_the_answer_leaves_the_server_slow(name):
    check_masked(name, n_images=1)


def test_unmasked_output_fails_the_same_check():
    """Without the mask the cryptonets output holds replicas of the logits (the issue's 1.79):
    the bound above is over ten times below them."""
    model, plan, xs = zoo_plan("fmnist-cryptonets")
    masked = probe(plan, model, xs[:1])
    bare = probe(plan, model, xs[:1], mask_output=False)
    assert bare.max_other > 10 * masked.noise_bound(0)
    assert masked.levels_used == bare.levels_used  # folded: no extra level


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_plan_ends_in_a_masking_kernel_at_no_extra_level(name):
    """Structure, on the data-free backend, for every zoo model (also those too large for CI):
    the last kernel masks its output, and the output level is the unmasked plan's."""
    _, plan, _ = zoo_plan(name)
    be = SymbolicBackend(plan.params)
    masked = plan.build_kernels(be, encode=False)
    bare = plan.build_kernels(be, encode=False, mask_output=False)
    assert masked[-1].masks_output and len(masked) == len(bare)
    assert masked[-1].out_level == bare[-1].out_level


def test_a_model_ending_in_a_convolution_gets_an_output_mask(rng):
    """No dense layer to fold the mask into: `OutputMask` multiplies by the answer slots (one
    level, planned by the lowering) and the other slots are noise."""
    from heinfer_packing.lower import lower
    from heinfer_packing.modelfile import Layer, Model
    from tests.conftest import small_params

    model = Model("conv-out", (1, 8, 8), [
        Layer("conv1", "conv2d", {"stride": 1, "padding": 1}, rng.normal(0, 0.3, (2, 1, 3, 3)),
              rng.normal(0, 0.1, 2)),
        Layer("act1", "poly", {"coeffs": [0.1, 0.5, 0.2]}),
        Layer("conv2", "conv2d", {"stride": 1, "padding": 0}, rng.normal(0, 0.3, (2, 2, 3, 3)),
              rng.normal(0, 0.1, 2)),
    ])
    plan = lower(model, small_params(4), first_conv="rotation")
    kernels = plan.build_kernels(SymbolicBackend(plan.params), encode=False)
    assert kernels[-1].name == "output_mask" and len(kernels) == len(plan.steps) + 1
    p = probe(plan, model, rng.normal(size=(2, 1, 8, 8)))
    assert p.max_answer_err < 1e-2
    for ct, (largest, bound) in p.within_noise().items():
        assert largest <= bound, (ct, largest, bound)
    bare = probe(plan, model, rng.normal(size=(1, 1, 8, 8)), mask_output=False)
    assert bare.max_other > 10 * p.noise_bound(0)


def test_batch_plans_hold_answers_in_every_slot(rng):
    """Throughput mode (one image per slot) has no other slots: slot b of output j is logit j
    of image b, and the slots the client left empty hold the model's answer to a zero image
    (an answer it could ask for anyway). Checked over every slot against numpy."""
    from heinfer.backends import make_backend
    from heinfer.codec import encode_encrypt_batch
    from heinfer.plan import CompiledPlan
    from heinfer_packing.lower import lower
    from heinfer_packing.modelfile import Layer, Model
    from tests.conftest import small_params

    model = Model("tiny-mlp", (1, 4, 4), [
        Layer("flatten", "flatten"),
        Layer("fc1", "dense", {}, rng.normal(0, 0.3, (6, 16)), rng.normal(0, 0.1, 6)),
        Layer("act1", "poly", {"coeffs": [0.1, 0.5, 0.2]}),
        Layer("fc2", "dense", {}, rng.normal(0, 0.3, (3, 6)), rng.normal(0, 0.1, 3)),
    ])
    plan = lower(model, small_params(3), batch=True)
    be = make_backend(plan.params)
    spec = plan.spec(be)
    be.generate_keys([])
    compiled = CompiledPlan(plan, be)
    assert compiled.kernels[-1].masks_output
    xs = rng.normal(size=(3, 1, 4, 4))
    cts = [be.ciphertext_from_bytes(b) for b in encode_encrypt_batch(be, spec, xs)]
    got = np.array([be.decrypt_complex(c) for c in compiled.run(cts)]) * spec.output.scale
    want = np.array([model.forward(x) for x in xs] + [model.forward(np.zeros_like(xs[0]))]).T
    full = np.concatenate([want[:, :3], np.repeat(want[:, 3:], be.slots - 3, axis=1)], axis=1)
    assert np.abs(got - full).max() < 5e-3 * max(1.0, np.abs(want).max())


# -- sanitized outputs (re-randomized and flooded) --------------------------------------------
def tiny_mlp(seed: int, spread: float = 0.3):
    from heinfer_packing.modelfile import Layer, Model

    r = np.random.default_rng(seed)
    return Model(f"mlp-{seed}", (16,), [
        Layer("fc1", "dense", {}, r.normal(0, spread, (8, 16)), r.normal(0, 0.1, 8)),
        Layer("act1", "poly", {"coeffs": [0.1, 0.5, 0.2]}),
        Layer("fc2", "dense", {}, r.normal(0, spread, (4, 8)), r.normal(0, 0.1, 4)),
    ])


def precise_params():
    """Insecure test ring (fast), 40-bit scale, 60-bit first prime: room for the flooding."""
    from heinfer.params import CKKSParams

    return CKKSParams.insecure_for_tests(4096, [60, 40, 40, 40, 60], 40)


def sanitized(model, xs, **opts):
    from heinfer_packing.lower import lower
    from heinfer_packing.privacy import sanitize_plan

    return sanitize_plan(lower(model, precise_params()), model, xs[:2], **opts)


def _parts(values: list[np.ndarray]) -> np.ndarray:
    v = np.concatenate(values)
    return np.concatenate([v.real, v.imag])


def test_sanitized_outputs_are_the_answer_plus_the_published_flooding():
    """The flooding's std is what the spec publishes (every slot, both parts), the answer is
    numpy's within its Gaussian tail, and the plan's own noise is 2^15+ times smaller."""
    model = tiny_mlp(1)
    xs = np.random.default_rng(7).normal(size=(6, 16))
    plan = sanitized(model, xs, stat_bits=30)
    flood = plan.flood_spec()
    assert flood.stat_bits == 30 and flood.sigma >= 2**15 * 6 * flood.noise_rms
    p = probe(plan, model, xs)
    other = _parts(p.other[0])
    assert abs(other.std() / flood.sigma - 1) < 0.1          # ~7000 samples: 1% standard error
    dev = _parts(p.answer_dev[0])
    tail = math.sqrt(2 * math.log(len(dev) / 1e-6))
    assert np.abs(dev).max() < tail * flood.sigma


def test_model_extraction_check_two_weight_sets():
    """The curious client probes two models of the same shape with different weights (the
    second's weights 3x larger) with the same chosen inputs (zero image, unit vectors, random).
    Sanitized: the other slots and the answer's noise have the same distribution for both
    (std within sampling error, two-sample Kolmogorov-Smirnov below its 1e-4 critical value),
    and two runs of one query differ. Masked only, the answer's noise follows the weights and
    the output is a deterministic function of weights and query (tested, so the check can
    fail)."""
    from heinfer.backends import make_backend
    from heinfer.codec import encode_encrypt
    from heinfer.plan import CompiledPlan
    from heinfer.sanitize import Sanitizer
    from heinfer_packing.lower import lower

    xs = np.concatenate([np.zeros((1, 16)), np.eye(16)[:3],
                         np.random.default_rng(3).normal(size=(2, 16))])
    m1, m2 = tiny_mlp(1), tiny_mlp(2, spread=0.9)
    p1, p2 = sanitized(m1, xs), sanitized(m2, xs)
    # one flooding for both versions (the owner fixes it; the spec publishes sigma)
    # (twice the larger: each sanitize_plan measures again, with fresh encryption noise)
    rms = 2 * max(p1.flood_spec().noise_rms, p2.flood_spec().noise_rms)
    p1, p2 = sanitized(m1, xs, noise_rms=rms), sanitized(m2, xs, noise_rms=rms)
    assert p1.flood_spec().sigma == p2.flood_spec().sigma
    a, b = probe(p1, m1, xs), probe(p2, m2, xs)
    for part in ("other", "answer_dev"):
        va, vb = _parts(getattr(a, part)[0]), _parts(getattr(b, part)[0])
        se = 3 / math.sqrt(2 * min(len(va), len(vb)))
        assert abs(va.std() / vb.std() - 1) < 5 * se, part
        critical = math.sqrt(-math.log(1e-4 / 2) / 2 * (len(va) + len(vb)) / (len(va) * len(vb)))
        assert ks_statistic(va, vb) < critical, part
    # contrast: masked but not sanitized, the answer's noise follows the weights
    bare1, bare2 = (probe(lower(m, precise_params()), m, xs) for m in (m1, m2))
    ratio = _parts(bare2.answer_dev[0]).std() / _parts(bare1.answer_dev[0]).std()
    assert ratio > 1.5, ratio
    # and one query's output is a function of weights and query only; sanitized, it is not
    replies = {}
    for name, plan in (("bare", lower(m1, precise_params())), ("sanitized", p1)):
        be = make_backend(plan.params)
        compiled = CompiledPlan(plan, be)
        be.generate_keys(compiled.spec.rotation_steps)
        be.load_public_key(be.public_key_bytes())
        sanitize = Sanitizer(be, plan.flood_spec()) if name == "sanitized" else (lambda c: c)
        cts = encode_encrypt(be, compiled.spec, xs[1])
        replies[name] = [be.ciphertext_to_bytes(sanitize(compiled.run(cts)[0]))
                         for _ in range(2)]
    assert replies["bare"][0] == replies["bare"][1]
    assert replies["sanitized"][0] != replies["sanitized"][1]


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def test_sanitized_plan_served_by_heinfer_serve(tmp_path):
    """Over loopback HTTP with the SDK: the spec publishes the flooding, a session without a
    public key is refused with a 400 naming it, the SDK (which sends its public key) gets
    answers within the flooding of numpy's, and the same query twice gives different bytes."""
    from heinfer import wire
    from heinfer.check import checked
    from heinfer_client import Client
    from heinfer_client.keys import LocalKeys
    from tests.test_server_support import (
        ALICE,
        http,
        post_keys,
        post_predict,
        problem,
        running_server,
        spec_of,
    )

    model = tiny_mlp(1)
    xs = np.random.default_rng(5).normal(size=(3, 16))
    # a server serves checked plans only (the check runs the kernels: flooding is the server's)
    plan = checked(sanitized(model, xs), np.random.default_rng(6).normal(size=(8, 16)),
                   model.forward)
    sigma = plan.flood_spec().sigma
    with running_server(tmp_path / "srv", [plan.save(tmp_path / "plans" / "mlp")]) as srv:
        c = http(srv.url)
        spec = spec_of(c, "mlp-1")
        assert spec.output.flood == {"stat_bits": 30, "queries": 1, "sigma": sigma}
        keys = LocalKeys(spec)
        body = keys.eval_keys_wire()
        frame = wire.parse_header(body)
        assert [x.type for x in frame.sections][-1] == wire.Section.PUBLIC_KEY
        no_pk = wire.encode_eval_keys(*wire.payloads(body, frame)[:2])
        assert "PUBLIC_KEY" in problem(post_keys(c, "mlp-1", no_pk), 400, "missing_keys")["detail"]
        sdk = Client(srv.url, ALICE, keystore=tmp_path / "keys", allow_insecure=True)
        s = sdk.model("mlp-1").session()
        for x in xs:
            got = s.predict(x, normalized=True).logits
            assert np.abs(got - model.forward(x)).max() < 8 * sigma * plan.output_scale
        query = s.keys.encode_encrypt(xs[0])
        r1, r2 = (post_predict(c, "mlp-1", s.id, query) for _ in range(2))
        assert r1.status_code == r2.status_code == 200 and r1.content != r2.content
        sdk.close()


def test_output_mask_as_one_level_instead_of_folded():
    """`output_mask="level"`: no folding (the last dense keeps its rotate-and-sum), one
    OutputMask level, one more prime, the same privacy; where the last level cannot hold the
    unrescaled layer any more the lowering says so instead of computing garbage."""
    from heinfer.errors import ModelFormatError
    from heinfer_packing.lower import lower

    model = tiny_mlp(1)
    xs = np.random.default_rng(9).normal(size=(2, 16))
    folded, level = lower(model), lower(model, output_mask="level")
    assert level.params.depth == folded.params.depth + 1
    kernels = level.build_kernels(SymbolicBackend(level.params), encode=False)
    assert kernels[-1].name == "output_mask" and kernels[-2].groups > 1
    p = probe(level, model, xs)
    assert p.max_answer_err < 6e-2
    for ct, (largest, bound) in p.within_noise().items():
        assert largest <= bound, (ct, largest, bound)
    with pytest.raises(ModelFormatError, match="too few"):
        lower(zoo.load("fmnist-cryptonets"), output_mask="level")


def test_bad_sanitizing_requests_are_clear_errors(capsys):
    """A corrupted flooding spec, no calibration images, a pinned noise below the measured one,
    and `--sanitize` without calibration data: one clear message each, never a traceback."""
    from heinfer.errors import ModelFormatError
    from heinfer_packing import cli
    from heinfer_packing.lower import lower
    from heinfer_packing.privacy import sanitize_plan

    model = tiny_mlp(1)
    plan = lower(model, precise_params())
    bad = sanitized(model, np.zeros((2, 16)))
    bad.metadata["privacy"] = {**bad.metadata["privacy"], "stat_bits": "thirty"}
    with pytest.raises(ModelFormatError, match="privacy"):
        bad.spec()
    with pytest.raises(ModelFormatError, match="calibration images"):
        sanitize_plan(plan, model, np.zeros((0, 16)))
    with pytest.raises(ModelFormatError, match="below"):
        sanitize_plan(plan, model, np.ones((1, 16)), noise_rms=1e-30)
    assert cli.main(["fmnist-tenseal-tutorial", "--sanitize", "30"]) == 2
    assert "--calib-fmnist" in capsys.readouterr().err


def test_auto_output_mask_prices_fold_against_level():
    """polyconv-1's last layer reads a full grid (folding: 3145 multiplies): the mask level is
    priced cheaper and chosen; cryptonets cannot have the level (35 bits left) and folds."""
    from heinfer_packing.lower import lower

    poly = lower(zoo.load("fmnist-polyconv-1"), output_mask="auto")
    choice = poly.metadata["output_mask_choice"]
    assert choice["chosen"] == "level" == poly.metadata["output_mask"]
    assert choice["prices"]["level"] < choice["prices"]["fold"]
    crypto = lower(zoo.load("fmnist-cryptonets"), output_mask="auto")
    assert crypto.metadata["output_mask_choice"]["chosen"] == "fold"
    assert "output_mask" not in crypto.metadata
