"""The TenSEAL backend with real CKKS: every operation, keys for exactly the asked steps,
seeded serialization, and the errors that replace SEAL's bare messages."""

import numpy as np
import pytest

from heinfer.backends import make_backend
from heinfer.errors import (
    DepthExhaustedError,
    MissingKeyError,
    ScaleMismatchError,
    SecretKeyError,
    SerializationError,
)
from tests.conftest import small_params

TOL = 1e-4


@pytest.fixture(scope="module")
def be():
    b = make_backend(small_params(2))
    b.generate_keys([1, -2, 5])
    return b


def test_encrypt_decrypt_roundtrip(be, rng):
    x = rng.normal(size=be.slots)
    assert np.abs(be.decrypt(be.encrypt(x)) - x).max() < TOL


def test_ops_match_numpy(be):
    rng = np.random.default_rng(1)
    x, y, w = (rng.normal(size=be.slots) for _ in range(3))
    cx, cy = be.encrypt(x), be.encrypt(y)
    top = be.params.top_level
    assert np.abs(be.decrypt(be.add(cx, cy)) - (x + y)).max() < TOL
    prod = be.multiply_plain(cx, be.encode(w, top, be.prime(top)))
    be.rescale_inplace(prod)
    assert be.level(prod) == top - 1
    assert abs(be.scale_of(prod) - be.scale_of(cx)) < 1e-6 * be.scale_of(cx)  # exact scale
    assert np.abs(be.decrypt(prod) - x * w).max() < TOL
    sq = be.multiply(cx, cy)
    be.rescale_inplace(sq)
    assert np.abs(be.decrypt(sq) - x * y).max() < 1e-3
    s2 = be.square(cx)
    assert np.abs(be.decrypt(s2) - x * x).max() < 1e-3
    ms = be.copy(cx)
    be.mod_switch_to_inplace(ms, top - 1)
    assert be.level(ms) == top - 1 and np.abs(be.decrypt(ms) - x).max() < TOL
    for step in (1, -2, 5):
        # key switching adds noise of about 2^-12 relative at these small test parameters
        assert np.abs(be.decrypt(be.rotate(cx, step)) - np.roll(x, -step)).max() < 1e-3


def test_rotation_without_key_is_refused(be):
    ct = be.encrypt(np.ones(be.slots))
    with pytest.raises(MissingKeyError, match="step 3"):
        be.rotate(ct, 3)


def test_galois_keys_only_for_asked_steps(be):
    assert be.rotation_steps == {1, be.slots - 2, 5}


def test_seeded_ciphertext_is_about_half(be):
    x = np.ones(be.slots)
    seeded = be.encrypt_to_bytes(x)
    full = be.ciphertext_to_bytes(be.encrypt(x))
    assert len(seeded) < 0.6 * len(full)
    ct = be.ciphertext_from_bytes(seeded)
    assert np.abs(be.decrypt(ct) - x).max() < TOL


def test_malformed_bytes(be):
    with pytest.raises(SerializationError):
        be.ciphertext_from_bytes(b"not a ciphertext" * 10)


def test_foreign_params_bytes_refused(be):
    other = make_backend(small_params(3))
    other.generate_keys([])
    data = other.encrypt_to_bytes(np.ones(other.slots))
    with pytest.raises(SerializationError):
        be.ciphertext_from_bytes(data)


def test_depth_exhaustion_has_a_clear_message(be):
    ct = be.encrypt(np.ones(be.slots))
    while be.level(ct) > 0:
        ct = be.square(ct)
        be.rescale_inplace(ct)
    with pytest.raises(DepthExhaustedError, match="depth"):
        be.rescale_inplace(ct)


def test_scale_mismatch_has_a_clear_message(be):
    a = be.encrypt(np.ones(be.slots))
    b = be.square(be.encrypt(np.ones(be.slots)))
    with pytest.raises(ScaleMismatchError, match="scales"):
        be.add(a, b)


def test_server_side_backend_has_no_secret(be):
    server = make_backend(be.params)
    with pytest.raises(SecretKeyError):
        server.decrypt(be.encrypt(np.ones(be.slots)))
    with pytest.raises(SecretKeyError):
        server.secret_key_bytes()


def test_encode_scale_too_large_has_a_clear_message(be):
    with pytest.raises(ScaleMismatchError, match="cannot encode at scale"):
        be.encode(np.ones(be.slots), 0, 2.0**60)
