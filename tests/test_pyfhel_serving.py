"""Plans compiled for the Pyfhel backend (SEAL 4.1, what node-seal speaks) served by a real
`heinfer serve`: the SDK with Pyfhel end to end on a real Fashion-MNIST image, sessions taking
turns on the one Pyfhel object, and the key validation unchanged (SEAL 4.3 keys, a secret key,
a tampered key all refused with a 4xx)."""

from __future__ import annotations

import numpy as np
import pytest

from heinfer import wire
from heinfer.backends import backend_available
from heinfer.plan import Plan
from heinfer_client import Client
from heinfer_client.keys import LocalKeys
from tests.test_server_support import (
    ALICE,
    http,
    new_session,
    post_keys,
    post_predict,
    problem,
    running_server,
    spec_of,
    tiny_model,
    tiny_plan,
)

pytestmark = pytest.mark.skipif(not backend_available("pyfhel"),
                                reason="Pyfhel not installed (make test installs it)")


def _pyfhel_plan(path, name: str, seed: int = 0):
    from heinfer.check import checked

    p = tiny_plan(path, name, seed)
    model = tiny_model(name, seed)
    xs = np.random.default_rng(seed).uniform(-1, 1, (8, *model.input_shape))
    # checked again on Pyfhel: for_backend drops the TenSEAL run's record
    return checked(Plan.load(p).for_backend("pyfhel"), xs, model.forward).save(path / name)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from heinfer_models import zoo
    from heinfer_packing.lower import lower

    d = tmp_path_factory.mktemp("pyfhel")
    plans = [_pyfhel_plan(d / "plans", "tinyp"), tiny_plan(d / "plans", "tinyt", seed=1)]
    from heinfer.check import checked
    from heinfer_models import fashion_mnist

    model = zoo.load("fmnist-cryptonets")
    fm = lower(model).for_backend("pyfhel")
    fm.name = "fmnist-pyfhel"
    fm = checked(fm, fashion_mnist.normalize(fashion_mnist.load("train")[0][:8]), model.forward)
    plans.append(fm.save(d / "plans" / "fmnist-pyfhel"))
    with running_server(d, plans) as s:
        yield s


def test_spec_names_pyfhel_and_seal_41(srv):
    with http(srv.url) as c:
        spec = spec_of(c, "tinyp")
        assert spec.backend.startswith("pyfhel/seal-4.1"), spec.backend
        assert spec_of(c, "tinyt").backend.startswith("tenseal/seal-4.3")


def test_sdk_with_pyfhel_gets_the_right_fashion_mnist_labels(srv, tmp_path):
    from heinfer_models import fashion_mnist, zoo

    images, labels = fashion_mnist.load("test")
    model = zoo.load("fmnist-cryptonets")
    c = Client(srv.url, ALICE, keystore=tmp_path)
    m = c.model("fmnist-pyfhel")
    assert m.keys().backend.name == "pyfhel"
    s = m.session()
    for i in range(3):
        p = s.predict(images[i])
        plain = model.forward(fashion_mnist.normalize(images[i:i + 1])[0]).reshape(-1)
        assert p.label == int(np.argmax(plain)), (i, p.logits, plain)
        assert np.abs(p.logits - plain).max() < 0.05 * np.abs(plain).max()
    assert [s.predict(images[i]).label for i in (0, 1)] == [int(labels[0]), int(labels[1])]


def test_sessions_take_turns_on_the_shared_pyfhel_object(srv):
    """One Pyfhel object holds one key set: each request must run under its own session's
    keys, whatever ran before (a wrong key decrypts to garbage, never silently)."""
    x = np.random.default_rng(4).normal(size=(1, 6, 6))
    want = tiny_model("tinyp").forward(x)
    with http(srv.url) as c:
        spec = spec_of(c, "tinyp")
        keys = [LocalKeys(spec), LocalKeys(spec)]
        sids = [new_session(c, "tinyp", k) for k in keys]
        for i in (0, 1, 0, 0, 1):
            r = post_predict(c, "tinyp", sids[i], keys[i].encode_encrypt(x))
            assert r.status_code == 200, r.text
            out = keys[i].decrypt_decode(r.content)
            assert np.abs(out - want).max() < 1e-2, (i, out, want)


def test_key_validation_is_unchanged_for_pyfhel_plans(srv):
    with http(srv.url) as c:
        spec = spec_of(c, "tinyp")
        seal43 = LocalKeys(spec_of(c, "tinyt"))  # TenSEAL (SEAL 4.3) keys for the 4.1 plan
        problem(post_keys(c, "tinyp", seal43.eval_keys_wire()), 400, "params_mismatch")
        mine = LocalKeys(spec)
        sk = mine.backend.he.to_bytes_secret_key("zstd")
        # a Pyfhel secret key as the relinearization keys: refused by the unchanged checks
        r = post_keys(c, "tinyp", wire.encode_eval_keys(sk, b"", []))
        assert r.status_code == 400 and r.json()["code"] in (
            "secret_key_refused", "malformed_keys"), r.text
        good = mine.eval_keys_wire()
        frame = wire.parse_header(good)
        for i, sec in enumerate(frame.sections):  # each section's SEAL header, then its size
            for at in (sec.offset + 3, sec.offset + 4, sec.offset + 8):  # major, minor, size
                bad = bytearray(good)
                bad[at] ^= 0x01
                r = post_keys(c, "tinyp", bytes(bad))
                assert r.status_code == 400, (i, at, r.text)
                assert r.json()["code"] in ("params_mismatch", "malformed_keys"), r.text
        assert post_keys(c, "tinyp", good).status_code == 201


def test_resumed_pyfhel_keys_bring_their_evaluation_keys():
    """Pyfhel makes evaluation keys only for the secret key of its own keyGen: a secret key
    loaded from a key store brings the ones stored with it, and refuses to invent others."""
    from heinfer.backends import make_backend
    from heinfer.errors import SecretKeyError
    from tests.conftest import small_params

    params = small_params(3)
    a = make_backend(params, "pyfhel")
    made = a.generate_keys([1, 2])
    b = make_backend(params, "pyfhel")
    b.load_secret_key(a.secret_key_bytes())
    assert b.make_eval_keys([2, 1]) == made
    with pytest.raises(SecretKeyError, match="cannot make evaluation keys"):
        b.make_eval_keys([3])
    server = make_backend(params, "pyfhel").with_eval_keys(b.make_eval_keys([1, 2]))
    x = np.linspace(-1, 1, b.slots)
    sq = server.square(server.ciphertext_from_bytes(b.encrypt_to_bytes(x)))
    assert np.abs(b.decrypt(sq)[:8] - x[:8] ** 2).max() < 1e-3


def test_compile_cli_backend_pyfhel(tmp_path, capsys):
    """`heinfer compile fmnist-cryptonets --backend pyfhel --out ...` (README): the plan names
    its backend, the spec says SEAL 4.1; the default stays TenSEAL with the same hash as before."""
    from heinfer_packing.cli import main

    assert main(["fmnist-cryptonets", "--backend", "pyfhel", "--no-progress",
                 "--out", str(tmp_path / "web")]) == 0
    assert main(["fmnist-cryptonets", "--no-progress", "--out", str(tmp_path / "ts")]) == 0
    web, ts = Plan.load(tmp_path / "web.plan.json"), Plan.load(tmp_path / "ts.plan.json")
    assert web.backend_name == "pyfhel" and ts.backend_name == "tenseal"
    assert "backend" not in ts.metadata and web.hash() != ts.hash()
    assert web.spec().backend.startswith("pyfhel/seal-4.1")
    # the same plan but for its backend (and its check record, which for_backend drops)
    assert web.for_backend("tenseal").hash() == ts.for_backend("tenseal").hash()
    assert web.metadata["check"]["passed"] and ts.metadata["check"]["passed"]
    with pytest.raises(SystemExit) as e:  # argparse: a usage error naming the choices
        main(["fmnist-cryptonets", "--backend", "seal9", "--no-progress"])
    assert e.value.code == 2 and "tenseal" in capsys.readouterr().err
