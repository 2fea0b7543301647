"""Conformal layers: the collapse M x / (c0 ||x|| + ||R x||^2) + b equals the layer-by-layer
ReSPro forward pass, whatever the number of blocks."""

import numpy as np
import pytest

from heinfer.errors import ModelFormatError
from heinfer_packing.conformal import ConformalBlock, ConformalNet, collapse


def random_net(rng, blocks: int, side: int = 12) -> ConformalNet:
    layers, c = [], 1
    for k in range(blocks):
        layers.append(ConformalBlock(rng.normal(0, 0.4, (3, c, 3, 3)),
                                     a=float(np.exp(rng.normal())), stride=1, padding=1,
                                     pool=2 if k == 1 else None))
        c = 3
    y = np.zeros((1, side, side))
    for b in layers:
        y = b.linear(y)
    return ConformalNet((1, side, side), layers, rng.normal(0, 0.2, (10, y.size)),
                        rng.normal(0, 0.1, 10))


@pytest.mark.parametrize("blocks", [1, 2, 4, 8])
def test_collapse_equals_the_layer_by_layer_forward(rng, blocks):
    net = random_net(rng, blocks)
    c = collapse(net)
    n = 12 * 12
    assert c.M.shape == (10, n) and c.R.shape[1] == n and c.R.shape[0] <= n
    for _ in range(3):
        x = rng.normal(size=(1, 12, 12))
        expected = net.forward(x)
        np.testing.assert_allclose(c.forward(x), expected, rtol=1e-10, atol=1e-12)
        # the client's part: from z = M x and q = ||R x||^2 to logits
        v = x.reshape(-1)
        np.testing.assert_allclose(c.finish(c.M @ v, float(np.sum((c.R @ v) ** 2)), x),
                                   expected, rtol=1e-10, atol=1e-12)


def test_t_is_positive_semidefinite_and_a_must_be_positive(rng):
    c = collapse(random_net(rng, 3))
    T = c.R.T @ c.R
    assert np.linalg.eigvalsh(T).min() > -1e-9
    with pytest.raises(ModelFormatError, match="a must be > 0"):
        ConformalNet((1, 4, 4), [ConformalBlock(np.ones((1, 1, 3, 3)), a=0.0, padding=1)],
                     np.ones((2, 16)), np.zeros(2))


def test_conformal_file_roundtrip(rng, tmp_path):
    from heinfer_packing.conformal import load_conformal, save_conformal

    net = random_net(rng, 2)
    save_conformal(net, tmp_path / "c", "c2", labels=["a"] * 10)
    again, doc = load_conformal(tmp_path / "c")
    x = rng.normal(size=(1, 12, 12))
    np.testing.assert_array_equal(again.forward(x), net.forward(x))
    assert doc["name"] == "c2"


@pytest.mark.parametrize("blocks", [1, 8])
def test_encrypted_conformal_is_depth_two_and_matches(rng, blocks):
    from heinfer.backends import make_backend
    from heinfer.codec import decrypt_decode, encode_encrypt, finish_output
    from heinfer.plan import CompiledPlan
    from heinfer_packing.conformal import lower_conformal

    net = random_net(rng, blocks)
    xs = rng.normal(size=(3, 1, 12, 12))
    plan, col = lower_conformal(net, f"c{blocks}", calib_x=xs)
    be = make_backend(plan.params)
    spec = plan.spec(be)
    assert spec.depth == 2 and spec.output.kind == "conformal"
    assert plan.params.security_bits() == 128
    be.generate_keys(spec.rotation_steps)
    compiled = CompiledPlan(plan, be)
    for x in xs:
        out = compiled.run(encode_encrypt(be, spec, x))
        assert len(out) == 2  # z and q
        logits = finish_output(spec, decrypt_decode(be, spec, out), x)
        expected = net.forward(x)
        assert np.abs(logits - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


def test_conformal_model_through_the_server_and_sdk(rng, tmp_path):
    """Like any other model: plan added to a real server, five SDK lines, logits finished on the
    client with its own x."""
    from heinfer_client import Client
    from heinfer_packing.conformal import lower_conformal
    from tests.test_server_support import ALICE, running_server

    net = random_net(rng, 4)
    xs = rng.normal(size=(2, 1, 12, 12))
    plan, _ = lower_conformal(net, "conformal4", labels=[str(i) for i in range(10)],
                              calib_x=xs)
    from heinfer.check import checked

    plan = checked(plan, rng.normal(size=(8, 1, 12, 12)), net.forward)
    plan_json = plan.save(tmp_path / "plans" / "conformal4")
    with running_server(tmp_path / "srv", [plan_json]) as srv:
        c = Client(srv.url, ALICE, keystore=tmp_path / "keys")
        s = c.model("conformal4").session()
        for x in xs:
            p = s.predict(x, normalized=True)
            expected = net.forward(x)
            assert np.abs(p.logits - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
            assert p.label == int(np.argmax(expected))
        c.close()
