"""Galois key budget: a plan keys only some rotation steps and composes the others from them.

Real CKKS runs with fewer keys than the kernels' steps give the same logits as the unbudgeted
plan and the plaintext model; the spec (what clients make keys for) lists only the keyed steps;
the report's counts include the composed rotations and equal a real run's; the key set is saved
in the plan and changes its hash; impossible budgets are clear errors.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from heinfer.backends import available_backends, make_backend
from heinfer.backends.base import galois_element
from heinfer.backends.counting import CountingBackend
from heinfer.codec import decrypt_decode, encode_encrypt
from heinfer.errors import KeyBudgetError, MissingKeyError
from heinfer.plan import CompiledPlan, Plan
from heinfer.rotations import choose_keys, power_of_two_keys, shortest_routes
from heinfer_client.keys import LocalKeys
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.keys import apply_key_budget, budget_variants, keys_for_mb
from heinfer_packing.lower import lower
from heinfer_packing.report import report
from tests.conftest import small_params
from tests.test_lowering import small_cnn

# Logits of fmnist-cryptonets are O(10); the default plan is within 6e-2 of the plaintext model
# (tests/test_end_to_end.py). Each composed rotation adds one more key switch (about 1e-3 on
# O(1) values at these parameters), far below what a wrong composition gives (O(1)).
LOGIT_BOUND = 6e-2


def _natural_steps(plan: Plan) -> list[int]:
    return sorted({s for s, _ in plan.rotation_counts()})


# -- routes and key choice (no encryption) ------------------------------------------------------
def test_routes_are_shortest_sums_of_keyed_steps():
    slots, keys = 64, [1, 8, 60]
    routes = shortest_routes(keys, range(1, slots), slots, max_len=slots)
    assert set(routes) == set(range(1, slots))
    for s, route in routes.items():
        assert sum(route) % slots == s and set(route) <= set(keys)
    # brute force: no shorter combination exists
    for s, route in routes.items():
        for n in range(1, len(route)):
            assert all(sum(c) % slots != s
                       for c in itertools.combinations_with_replacement(keys, n)), s
    assert routes[8] == (8,) and sorted(routes[9]) == [1, 8] and len(routes[56]) == 2  # 60+60
    assert shortest_routes([16], [3], slots) == {}  # 3 is no multiple of 16: unreachable


def test_choice_respects_the_budget_and_reaches_every_step():
    slots = 4096
    weights = {1: 9, 4: 3, 10: 1, 28: 2, 40: 1, 80: 1, 128: 5, 512: 2, 2048: 1, 4095: 4}
    assert choose_keys(weights, slots, 10) == sorted(weights)  # enough keys: one per step
    for budget in (8, 6, 4):
        keys = choose_keys(weights, slots, budget)
        assert len(keys) <= budget
        assert set(shortest_routes(keys, weights, slots)) == set(weights)
    assert 1 in choose_keys(weights, slots, 6)  # the most used step keeps its key
    assert power_of_two_keys([3, 12, 40], slots) == [1, 2, 4, 8, 32]
    with pytest.raises(KeyBudgetError, match="budget of 0 Galois keys"):
        choose_keys(weights, slots, 0)


# -- a compiled plan under a budget ----------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_plans():
    rng = np.random.default_rng(1234)
    model = small_cnn(rng)
    plan = lower(model, small_params(5), first_conv="rotation")
    return model, plan, plan.with_key_budget(5)


def test_spec_lists_only_keyed_steps_and_counts_include_compositions(cnn_plans):
    _, plan, budgeted = cnn_plans
    natural = _natural_steps(plan)
    assert len(natural) > 5
    assert plan.spec().rotation_steps == natural
    spec = budgeted.spec()
    assert len(spec.rotation_steps) <= 5
    assert spec.rotation_steps == budgeted.key_budget["steps"]
    full, cut = report(plan), report(budgeted)
    assert cut.rotation_steps == spec.rotation_steps
    compiled = CompiledPlan(budgeted, make_backend(budgeted.params, "tenseal"))
    routes = compiled.rotations.routes
    assert set(routes) == set(natural) and set(compiled.rotations.keys) == set(spec.rotation_steps)
    # every rotation by step s became len(route(s)) rotations, at the same level
    expected: dict[int, int] = {}
    for (step, level), n in plan.rotation_counts().items():
        expected[level] = expected.get(level, 0) + n * len(routes[step])
    for full_layer, cut_layer in zip(full.layers, cut.layers, strict=True):
        for op in ("multiply_plain", "rescale", "square"):
            assert full_layer.count(op) == cut_layer.count(op)
    got: dict[int, int] = {}
    for layer in cut.layers:
        for (op, level), n in layer.ops.items():
            if op == "rotate":
                got[level] = got.get(level, 0) + n
    assert got == expected
    assert sum(got.values()) > sum(layer.count("rotate") for layer in full.layers)
    assert "Galois key budget 5" in cut.to_text()


@pytest.mark.parametrize("backend_name", available_backends())
def test_budgeted_cnn_runs_encrypted_with_only_its_keys(cnn_plans, backend_name):
    model, plan, budgeted = cnn_plans
    x = np.random.default_rng(7).normal(size=(1, 12, 12))
    outs, counts = {}, {}
    for name, p in (("full", plan), ("budget", budgeted)):
        be = make_backend(p.params, backend_name)
        compiled = CompiledPlan(p, be)
        keys = be.generate_keys(compiled.spec.rotation_steps)  # exactly the spec's steps
        assert keys.rotation_steps == compiled.spec.rotation_steps
        counter = CountingBackend(be)
        out = compiled.run(encode_encrypt(be, compiled.spec, x), counter)
        outs[name] = decrypt_decode(be, compiled.spec, out) * p.output_scale
        counts[name] = dict(counter.counts)
        if name == "budget":
            # the symbolic report counts what the real run did, composed rotations included
            assert counts[name] == {k: v for k, v in _sum_layers(report(p)).items()}
            composed = next(iter(compiled.rotations.composed))
            with pytest.raises(MissingKeyError):  # no key for a composed step: it is composed
                be.rotate(encode_encrypt(be, compiled.spec, x)[0], composed)
    expected = model.forward(x)
    bound = 5e-3 * max(1, np.abs(expected).max())
    assert np.abs(outs["full"] - expected).max() < bound
    assert np.abs(outs["budget"] - expected).max() < bound
    assert np.abs(outs["budget"] - outs["full"]).max() < bound


def _sum_layers(rep) -> dict:
    total: dict = {}
    for layer in rep.layers:
        for k, n in layer.ops.items():
            total[k] = total.get(k, 0) + n
    return total


def test_client_makes_keys_for_the_keyed_steps_only(cnn_plans):
    _, plan, budgeted = cnn_plans
    compiled = CompiledPlan(budgeted, make_backend(budgeted.params))
    keys = LocalKeys(compiled.spec)
    be = keys.backend
    n = budgeted.params.poly_modulus_degree
    assert be.rotation_steps == set(compiled.spec.rotation_steps)
    for s in compiled.spec.rotation_steps:
        assert be.galois_keys.has_key(galois_element(s, n))
    for s in compiled.rotations.composed:
        assert not be.galois_keys.has_key(galois_element(s, n))
    assert keys.eval_keys_wire()  # the upload body is made from these keys


def test_save_load_keeps_the_key_set_and_changes_the_hash(cnn_plans, tmp_path):
    _, plan, budgeted = cnn_plans
    assert "galois_keys" not in plan._doc()["metadata"]  # plans without a budget hash as before
    assert budgeted.hash() != plan.hash()
    assert plan.with_key_budget(6).hash() != budgeted.hash()
    path = budgeted.save(tmp_path / "b")
    loaded = Plan.load(path)
    assert loaded.key_budget == budgeted.key_budget
    assert loaded.hash() == budgeted.hash()
    assert loaded.spec().rotation_steps == budgeted.spec().rotation_steps
    doc = json.loads(path.read_text())
    assert doc["metadata"]["galois_keys"]["steps"] == budgeted.key_budget["steps"]
    # an explicit key set stored in the plan is used as is
    explicit = plan.with_key_budget(keys=power_of_two_keys(_natural_steps(plan),
                                                           plan.params.slots))
    assert explicit.spec().rotation_steps == explicit.key_budget["steps"]
    assert explicit.key_budget["max_keys"] is None
    # a plan carrying only a maximum chooses its keys when built, as the compiler would
    lazy = Plan.load(plan.save(tmp_path / "lazy"))
    lazy.metadata["galois_keys"] = {"max_keys": 5}
    assert lazy.spec().rotation_steps == budgeted.key_budget["steps"]


def test_impossible_budgets_are_clear_errors(cnn_plans, tmp_path):
    _, plan, _ = cnn_plans
    with pytest.raises(KeyBudgetError, match="budget of 0 Galois keys"):
        plan.with_key_budget(0)
    with pytest.raises(KeyBudgetError, match="cannot compose rotation step"):
        plan.with_key_budget(keys=[144])
    with pytest.raises(KeyBudgetError, match="cannot compose"):
        plan.with_key_budget(2)
    # a stored budget that does not fit the kernels is refused when the plan is loaded
    bad = plan.with_key_budget(5)
    bad.metadata["galois_keys"] = {"max_keys": 5, "steps": [144]}
    with pytest.raises(KeyBudgetError, match="cannot compose"):
        Plan.load(bad.save(tmp_path / "bad")).spec()
    bad.metadata["galois_keys"] = {"max_keys": "five"}
    with pytest.raises(KeyBudgetError, match="non-negative integer"):
        bad.spec()
    with pytest.raises(KeyBudgetError, match="needs the key sizes"):
        apply_key_budget(plan, max_key_mb=10)


def test_key_size_limit_and_variants():
    cal = {"sizes": {"relin_key_bytes": 1_000_000, "galois_key_bytes": 1_500_000},
           "ms": {"rotate": {str(lv): 1.0 + lv for lv in range(6)}}}
    assert keys_for_mb(7.1, cal) == 4 and keys_for_mb(0.5, cal) == 0
    rng = np.random.default_rng(1234)
    plan = lower(small_cnn(rng), small_params(5), first_conv="rotation")
    limited = apply_key_budget(plan, calibration=cal, max_key_mb=7.1)
    assert len(limited.spec().rotation_steps) <= 4
    labels = [label for label, _ in budget_variants(plan, cal, max_keys=6)]
    assert "6 keys" in labels
    # the power-of-two key set is a variant when it is smaller than the plan's own steps
    natural = _natural_steps(plan)
    pow2 = power_of_two_keys(natural, plan.params.slots)
    assert ("pow2 keys" in labels) == (len(pow2) < len(natural))


# -- the shipped model at its real 128-bit parameters -------------------------------------------
def test_shipped_cryptonets_with_half_the_keys():
    images, _ = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[:2])
    model = zoo.load("fmnist-cryptonets")
    plan = lower(model)
    budgeted = plan.with_key_budget(len(_natural_steps(plan)) // 2)
    assert budgeted.params.security_bits() == 128
    logits = {}
    for name, p in (("full", plan), ("budget", budgeted)):
        be = make_backend(p.params)
        compiled = CompiledPlan(p, be)
        be.generate_keys(compiled.spec.rotation_steps)
        logits[name] = np.array([
            decrypt_decode(be, compiled.spec, compiled.run(encode_encrypt(be, compiled.spec, x)))
            * p.output_scale for x in xs])
    assert len(budgeted.spec().rotation_steps) < len(plan.spec().rotation_steps)
    plain = np.array([model.forward(x) for x in xs])
    assert np.abs(logits["budget"] - plain).max() < LOGIT_BOUND
    assert np.abs(logits["budget"] - logits["full"]).max() < LOGIT_BOUND
    assert (logits["budget"].argmax(1) == plain.argmax(1)).all()
