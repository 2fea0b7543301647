"""The packing contract (heinfer.contract) against heinfer's layouts, slot for slot, for every
zoo model and both first-convolution forms and throughput mode; and a real encrypted round trip
through it (the SDK's path)."""

from __future__ import annotations

import numpy as np
import pytest

from heinfer.contract import PackingContract, check_against_layouts, runs_of
from heinfer.errors import LayoutError
from heinfer.layout import GridLayout, VectorLayout
from heinfer_models import zoo


def _plan(name: str, **opts):
    from heinfer_packing.conformal import ConformalNet, lower_conformal
    from heinfer_packing.lower import lower

    model = zoo.load(name)
    if isinstance(model, ConformalNet):
        if opts:
            pytest.skip("conformal networks have one lowering")
        return lower_conformal(model, name, model.metadata.get("labels"))[0]
    return lower(model, **opts)


def _check(plan) -> PackingContract:
    spec = plan.spec()
    assert spec.packing is not None
    out_layout = spec.output_layout_obj()
    check_against_layouts(spec.packing, plan.input_layout, out_layout, np.random.default_rng(1))
    # the contract round-trips through JSON (what a browser receives)
    again = PackingContract.model_validate_json(spec.packing.model_dump_json())
    assert again == spec.packing
    assert spec.packing.input.level == plan.params.top_level
    assert spec.packing.input.scale == plan.params.scale
    return spec.packing


@pytest.mark.parametrize("name", zoo.names())
def test_contract_matches_layouts_for_every_zoo_model(name):
    c = _check(_plan(name))
    assert c.output.ciphertexts >= 1 and c.input.ciphertexts >= 1


@pytest.mark.parametrize("opts", [{"first_conv": "rotation"}, {"batch": True}])
def test_contract_matches_other_lowerings(opts):
    c = _check(_plan("fmnist-cryptonets", **opts))
    assert c.input.batch == bool(opts.get("batch"))


def test_contract_grid_with_replicas_and_gaps():
    lay = GridLayout((3, 5, 5), 1024, channels_per_ct=2, block=64, row_stride=10, col_stride=2,
                     offset=3)
    from heinfer.contract import packing_contract

    c = packing_contract(lay, VectorLayout(10, 1024, offset=5, stride=7), 1024, 3, 2.0**30, 0.5)
    check_against_layouts(c, lay, VectorLayout(10, 1024, offset=5, stride=7),
                          np.random.default_rng(2))
    rep = GridLayout((1, 4, 4), 256, channels_per_ct=1, block=16, row_stride=4, replicas=3)
    c = packing_contract(rep, VectorLayout(4, 256), 256, 1, 2.0**20, 1.0)
    check_against_layouts(c, rep, VectorLayout(4, 256), np.random.default_rng(3))
    # every replica listed: 3 copies of 16 elements
    assert sum(r[3] for r in c.input.runs) == 48


def test_runs_are_maximal_affine_pieces():
    ct = np.zeros(7, dtype=int)
    slot = np.array([0, 2, 4, 6, 7, 8, 20])
    elem = np.array([0, 1, 2, 3, 4, 5, 6])
    assert runs_of(ct, slot, elem) == [[0, 0, 2, 4, 0, 1], [0, 7, 1, 2, 4, 1],
                                       [0, 20, 1, 1, 6, 1]]


def test_contract_refuses_wrong_shapes():
    c = _plan("fmnist-cryptonets").spec().packing
    with pytest.raises(LayoutError, match="does not match"):
        c.pack(np.zeros((1, 27, 28)))
    with pytest.raises(LayoutError, match="ciphertexts given"):
        c.unpack([])


def test_sdk_round_trip_reads_through_the_contract():
    """Real CKKS: encrypt with the contract's packing, run the plan, decode with the contract;
    equals the plaintext reference."""
    from heinfer.backends import make_backend
    from heinfer.codec import decrypt_decode, encode_encrypt
    from heinfer.plan import CompiledPlan
    from heinfer_models import fashion_mnist

    plan = _plan("fmnist-cryptonets")
    compiled = CompiledPlan(plan, make_backend(plan.params))
    client = make_backend(plan.params)
    client.generate_keys(compiled.spec.rotation_steps)
    server = compiled.backend.with_eval_keys(client.make_eval_keys(compiled.spec.rotation_steps))
    images, labels = fashion_mnist.load("test")
    x = fashion_mnist.normalize(images[:1])[0]
    cts = compiled.run(encode_encrypt(client, compiled.spec, x), server)
    out = decrypt_decode(client, compiled.spec, cts)
    want = zoo.load("fmnist-cryptonets").forward(x).reshape(-1)
    assert out.shape == want.shape
    assert np.abs(out - want).max() < 0.05 * np.abs(want).max()
    assert int(np.argmax(out)) == int(np.argmax(want))
