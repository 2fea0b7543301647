"""One contract for every backend (TenSEAL, Pyfhel), on real CKKS: encode, encrypt, every operation,
rotations with only the generated keys, serialization round trips, the errors; then every kernel
test and every shipped model re-run on Pyfhel, and the interoperability decision (a SEAL version
mismatch is refused with a clear error before parsing, never a crash).

Pyfhel is an optional extra built from source (`bash scripts/build_pyfhel.sh --install`);
its cases are skipped, with that reason, only when it cannot be imported, unless
HEINFER_REQUIRE_PYFHEL=1 (CI sets it): then a missing Pyfhel fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from heinfer.backends import (
    PYFHEL_MISSING,
    backend_available,
    backend_for_spec,
    make_backend,
)
from heinfer.backends.sealwire import (
    check_seal_bytes,
    check_spec_backend,
    parse_wire_format,
    read_seal_header,
)
from heinfer.errors import (
    DepthExhaustedError,
    HeinferError,
    MissingKeyError,
    ParamsMismatchError,
    ScaleMismatchError,
    SecretKeyError,
    SerializationError,
)
from heinfer.layout import VectorLayout
from heinfer.plan import Plan, PlanStep
from tests import test_kernels as kernel_tests
from tests.conftest import run_encrypted, small_params

HAS_PYFHEL = backend_available("pyfhel")
needs_pyfhel = pytest.mark.skipif(not HAS_PYFHEL, reason=PYFHEL_MISSING)
BACKEND_NAMES = ["tenseal", pytest.param("pyfhel", marks=needs_pyfhel)]
SEAL_VERSIONS = {"tenseal": (4, 3), "pyfhel": (4, 1)}
# what the backend's API allows: TenSEAL (sealapi) writes seeded uploads and keys, Pyfhel cannot
SEEDED = {"tenseal": True, "pyfhel": False}
STEPS = [1, -2, 5]
TOL = 1e-4
KS_TOL = 1e-3  # key switching (rotation, relinearization) noise at these small test parameters


@pytest.fixture(scope="module", params=BACKEND_NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def keyed(name):
    """A client backend with keys for STEPS, and the evaluation-key bytes it sent."""
    be = make_backend(small_params(2), name)
    keys = be.generate_keys(STEPS)
    return be, keys


@pytest.fixture(scope="module")
def be(keyed):
    return keyed[0]


@pytest.fixture()
def xyw(be):
    rng = np.random.default_rng(7)
    return tuple(rng.normal(size=be.slots) for _ in range(3))


def err(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max())


def test_pyfhel_is_installed_when_required():
    if os.environ.get("HEINFER_REQUIRE_PYFHEL") == "1":
        assert HAS_PYFHEL, PYFHEL_MISSING


# -- the interface ------------------------------------------------------------------------
def test_every_method_the_runtime_uses_is_there(be, name):
    methods = ["encode", "encrypt", "encrypt_to_bytes", "decrypt", "add", "add_inplace", "sub",
               "add_plain_inplace", "multiply_plain", "multiply", "square", "rescale_inplace",
               "mod_switch_to_inplace", "rotate", "copy", "level", "scale_of", "prime",
               "generate_keys", "load_eval_keys", "secret_key_bytes", "load_secret_key",
               "ciphertext_to_bytes", "ciphertext_from_bytes"]
    assert all(callable(getattr(be, m)) for m in methods)
    assert be.name == name and be.slots == be.params.slots == 2048 and be.has_secret_key
    assert be.seal_version == SEAL_VERSIONS[name]
    assert be.wire_format == f"{name}/seal-{be.seal_version[0]}.{be.seal_version[1]}"


def test_primes_are_the_chain_and_the_same_on_both_backends(be):
    params = be.params
    primes = [be.prime(level) for level in range(params.top_level + 1)]
    assert [p.bit_length() for p in primes] == params.coeff_mod_bits[: params.top_level + 1]
    # both SEAL versions pick the same primes for the same sizes (so spec params mean one thing)
    reference = make_backend(params, "tenseal")
    assert primes == [reference.prime(level) for level in range(params.top_level + 1)]


# -- encode / encrypt -------------------------------------------------------------------------
def test_encrypt_decrypt_roundtrip(be, xyw):
    x = xyw[0]
    ct = be.encrypt(x)
    assert be.level(ct) == be.params.top_level
    assert be.scale_of(ct) == be.params.scale
    assert err(be.decrypt(ct), x) < TOL


def test_encode_at_every_level_keeps_scales_exact(be, xyw):
    """Plaintexts encoded at scale = prime(level) make multiply + rescale return the input scale,
    at every level of the chain (the kernels rely on this)."""
    x, _, w = xyw
    ct = be.encrypt(x)
    expect = x.copy()
    for level in range(be.params.top_level, 0, -1):
        assert be.level(ct) == level
        pt = be.encode(w, level, be.prime(level))
        ct = be.multiply_plain(ct, pt)
        be.rescale_inplace(ct)
        expect = expect * w
        assert be.level(ct) == level - 1
        assert be.scale_of(ct) == pytest.approx(be.params.scale, rel=1e-9)
        assert err(be.decrypt(ct), expect) < TOL * max(1, np.abs(expect).max())


def test_encode_complex_shape_and_scale_bounds(be):
    with pytest.raises(ValueError, match="slot values"):
        be.encode(np.ones(be.slots + 1), be.params.top_level, be.params.scale)
    with pytest.raises(ScaleMismatchError, match="cannot encode at scale"):  # never SEAL's bare
        be.encode(np.ones(be.slots), 0, 2.0 ** be.params.coeff_mod_bits[0])
    z = np.full(be.slots, 0.5 + 0.25j)
    pt = be.encode(z, be.params.top_level, be.params.scale)
    ct = be.encrypt(np.ones(be.slots))
    be.add_plain_inplace(ct, pt)
    assert err(be.decrypt(ct), 1.5) < TOL  # decrypt returns the real part


# -- every operation -------------------------------------------------------------------------
def test_additive_ops(be, xyw):
    x, y, w = xyw
    cx, cy = be.encrypt(x), be.encrypt(y)
    assert err(be.decrypt(be.add(cx, cy)), x + y) < TOL
    assert err(be.decrypt(be.sub(cx, cy)), x - y) < TOL
    acc = be.copy(cx)
    be.add_inplace(acc, cy)
    assert err(be.decrypt(acc), x + y) < TOL
    assert err(be.decrypt(cx), x) < TOL  # the copy was independent
    be.add_plain_inplace(acc, be.encode(w, be.params.top_level, be.params.scale))
    assert err(be.decrypt(acc), x + y + w) < TOL


def test_multiplicative_ops(be, xyw):
    x, y, w = xyw
    cx, cy = be.encrypt(x), be.encrypt(y)
    top = be.params.top_level
    prod = be.multiply_plain(cx, be.encode(w, top, be.prime(top)))
    be.rescale_inplace(prod)
    assert err(be.decrypt(prod), x * w) < TOL * 10
    m = be.multiply(cx, cy)
    assert be.level(m) == top  # relinearized, not rescaled
    be.rescale_inplace(m)
    assert err(be.decrypt(m), x * y) < KS_TOL * 10
    s = be.square(cx)
    be.rescale_inplace(s)
    assert err(be.decrypt(s), x * x) < KS_TOL * 10
    assert be.level(m) == be.level(s) == top - 1


def test_mod_switch(be, xyw):
    x = xyw[0]
    ct = be.encrypt(x)
    be.mod_switch_to_inplace(ct, be.params.top_level)  # no-op
    be.mod_switch_to_inplace(ct, 0)
    assert be.level(ct) == 0 and be.scale_of(ct) == be.params.scale
    assert err(be.decrypt(ct), x) < TOL
    with pytest.raises(ScaleMismatchError, match="up"):
        be.mod_switch_to_inplace(ct, 1)


def test_rotations_with_the_generated_keys(be, xyw):
    x = xyw[0]
    ct = be.encrypt(x)
    for step in STEPS:
        assert err(be.decrypt(be.rotate(ct, step)), np.roll(x, -step)) < KS_TOL
    assert err(be.decrypt(be.rotate(ct, be.slots - 2)), np.roll(x, 2)) < KS_TOL  # same key as -2
    assert err(be.decrypt(be.rotate(ct, 0)), x) < TOL
    # rotations work at lower levels with the same keys
    be.mod_switch_to_inplace(ct, 0)
    assert err(be.decrypt(be.rotate(ct, 5)), np.roll(x, -5)) < KS_TOL


def test_keys_only_for_the_asked_steps(be):
    assert be.rotation_steps == {1, be.slots - 2, 5}
    ct = be.encrypt(np.ones(be.slots))
    for missing in (2, 3, -1, 4):
        with pytest.raises(MissingKeyError, match=f"step {missing % be.slots}"):
            be.rotate(ct, missing)


def test_no_steps_means_no_galois_keys(name):
    be = make_backend(small_params(1), name)
    keys = be.generate_keys([0])
    assert keys.galois_keys == b"" and keys.rotation_steps == []
    with pytest.raises(MissingKeyError):
        be.rotate(be.encrypt(np.ones(be.slots)), 1)


def test_galois_key_bytes_grow_with_the_steps_only(name):
    params = small_params(1)
    one = make_backend(params, name).generate_keys([1]).galois_keys
    three = make_backend(params, name).generate_keys([1, 2, 3]).galois_keys
    assert 2.5 < len(three) / len(one) < 3.5  # one key per step, nothing else


# -- serialization ----------------------------------------------------------------------------
def test_ciphertext_bytes_roundtrip_keeps_level_and_scale(be, xyw):
    x, _, w = xyw
    ct = be.encrypt(x)
    for level in range(be.params.top_level, -1, -1):
        back = be.ciphertext_from_bytes(be.ciphertext_to_bytes(ct))
        assert be.level(back) == level and be.scale_of(back) == be.scale_of(ct)
        assert err(be.decrypt(back), be.decrypt(ct)) < 1e-9
        if level:
            ct = be.multiply_plain(ct, be.encode(w, level, be.prime(level)))
            be.rescale_inplace(ct)


def test_upload_bytes(be, name):
    x = np.ones(be.slots)
    upload = be.encrypt_to_bytes(x)
    full = be.ciphertext_to_bytes(be.encrypt(x))
    assert read_seal_header(upload).version == be.seal_version
    if SEEDED[name]:
        assert len(upload) < 0.6 * len(full)  # seeded: about half
    else:
        assert len(upload) < 1.1 * len(full)  # Pyfhel: full size (documented)
    ct = be.ciphertext_from_bytes(upload)
    assert be.level(ct) == be.params.top_level
    assert err(be.decrypt(ct), x) < TOL


def test_server_evaluates_with_key_bytes_only(keyed, name, xyw):
    client, keys = keyed
    x, y, _ = xyw
    server = make_backend(client.params, name)
    assert not server.has_secret_key
    with pytest.raises(MissingKeyError):
        server.multiply(client.encrypt(x), client.encrypt(y))
    server.load_eval_keys(keys)
    assert server.rotation_steps == client.rotation_steps
    cx = server.ciphertext_from_bytes(client.encrypt_to_bytes(x))
    cy = server.ciphertext_from_bytes(client.encrypt_to_bytes(y))
    out = server.rotate(server.multiply(cx, cy), 1)
    server.rescale_inplace(out)
    reply = server.ciphertext_to_bytes(out)
    got = client.decrypt(client.ciphertext_from_bytes(reply))
    assert err(got, np.roll(x * y, -1)) < KS_TOL * 10
    with pytest.raises(MissingKeyError):
        server.rotate(cx, 3)
    with pytest.raises(SecretKeyError):
        server.decrypt(cx)
    with pytest.raises(SecretKeyError):
        server.encrypt(x)
    with pytest.raises(SecretKeyError):
        server.secret_key_bytes()


def test_secret_key_roundtrip_resumes_a_client(be, name, xyw):
    x = xyw[0]
    data = be.secret_key_bytes()
    resumed = make_backend(be.params, name)
    resumed.load_secret_key(data)
    assert resumed.has_secret_key
    assert err(resumed.decrypt(be.encrypt(x)), x) < TOL  # same key
    assert err(be.decrypt(resumed.ciphertext_from_bytes(resumed.encrypt_to_bytes(x))), x) < TOL


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"not a ciphertext" * 10, b"\x5e\xa1\x10" + b"\0" * 40])
def test_malformed_bytes(be, data):
    with pytest.raises(SerializationError):
        be.ciphertext_from_bytes(data)


def test_truncated_and_corrupted_bytes_never_crash(be):
    good = be.ciphertext_to_bytes(be.encrypt(np.ones(be.slots)))
    rng = np.random.default_rng(3)
    bad = [good[: len(good) // 2], good + b"\0", good[:16] + b"\xff" * (len(good) - 16)]
    for _ in range(8):
        b = bytearray(good)
        pos = rng.integers(16, 120, size=3)  # metadata fields just after the header
        for p in pos:
            b[p] ^= 0xFF
        bad.append(bytes(b))
    for data in bad:
        try:
            be.ciphertext_from_bytes(data)
        except HeinferError:
            pass  # refused with our error: fine; loading garbage silently is fine too (noise)


def test_foreign_params_bytes_refused(be, name):
    other = make_backend(small_params(3), name)
    other.generate_keys([])
    with pytest.raises(SerializationError):
        be.ciphertext_from_bytes(other.encrypt_to_bytes(np.ones(other.slots)))
    fresh = make_backend(be.params, name)  # a failed load may leave a backend without keys
    with pytest.raises((ParamsMismatchError, SerializationError)):
        fresh.load_eval_keys(other.generate_keys([1]))
    with pytest.raises(MissingKeyError):
        fresh.square(fresh.ciphertext_from_bytes(be.encrypt_to_bytes(np.ones(be.slots))))


def test_depth_exhaustion_has_a_clear_message(be):
    ct = be.encrypt(np.ones(be.slots))
    while be.level(ct) > 0:
        ct = be.square(ct)
        be.rescale_inplace(ct)
    with pytest.raises(DepthExhaustedError, match="depth"):
        be.rescale_inplace(ct)
    with pytest.raises(DepthExhaustedError, match="bits"):
        be.square(ct)


def test_scale_and_level_mismatches_have_clear_messages(be):
    a = be.encrypt(np.ones(be.slots))
    b = be.square(be.encrypt(np.ones(be.slots)))
    with pytest.raises(ScaleMismatchError, match="scales"):
        be.add(a, b)
    low = be.copy(a)
    be.mod_switch_to_inplace(low, 0)
    with pytest.raises(ScaleMismatchError, match="levels"):
        be.add(a, low)
    with pytest.raises(ScaleMismatchError, match="levels"):
        be.multiply(a, low)
    with pytest.raises(ScaleMismatchError, match="level"):
        be.multiply_plain(a, be.encode(np.ones(be.slots), 0, be.params.scale))
    with pytest.raises(ScaleMismatchError, match="scales"):
        be.add_plain_inplace(a, be.encode(np.ones(be.slots), be.params.top_level, 2.0**20))
    with pytest.raises(ScaleMismatchError, match="below 1"):
        be.rescale_inplace(be.copy(a))


# -- interoperability: named in the spec, refused before parsing --------------------------------
@needs_pyfhel
@pytest.mark.parametrize("client_name,server_name", [("tenseal", "pyfhel"),
                                                     ("pyfhel", "tenseal")])
def test_seal_version_mismatch_is_refused_before_parsing(client_name, server_name):
    params = small_params(1)
    client = make_backend(params, client_name)
    keys = client.generate_keys([1])
    server = make_backend(params, server_name)
    sv, cv = (f"SEAL {v[0]}.{v[1]}" for v in (server.seal_version, client.seal_version))
    data = client.encrypt_to_bytes(np.ones(client.slots))
    with pytest.raises(SerializationError, match=f"written by {cv}.*runs {sv}") as e:
        server.ciphertext_from_bytes(data)
    assert server.wire_format in str(e.value)  # tells the client which backend to use
    with pytest.raises(SerializationError, match="relinearization keys"):
        server.load_eval_keys(keys)
    assert not server.rotation_steps
    # the server stays usable: its own client's data still works
    own = make_backend(params, server_name)
    own_keys = own.generate_keys([1])
    server.load_eval_keys(own_keys)
    ct = server.rotate(server.ciphertext_from_bytes(own.encrypt_to_bytes(np.arange(own.slots))),
                       1)
    assert err(own.decrypt(ct), np.roll(np.arange(own.slots), -1)) < 1e-2


def test_header_checks():
    be = make_backend(small_params(1), "tenseal")
    be.generate_keys([])
    data = be.ciphertext_to_bytes(be.encrypt(np.ones(be.slots)))
    h = read_seal_header(data)
    assert h.version == (4, 3) and h.compr_mode == "zstd" and h.size == len(data)
    with pytest.raises(SerializationError, match="announces"):
        read_seal_header(data[:-1])
    with pytest.raises(SerializationError, match="SEAL 4.3.*runs SEAL 4.1"):
        check_seal_bytes(data, (4, 1), "pyfhel", "ciphertext")
    assert parse_wire_format("pyfhel/seal-4.1") == ("pyfhel", (4, 1))
    assert parse_wire_format("seal-4") is None


@pytest.mark.parametrize("server_name", BACKEND_NAMES)
def test_spec_names_backend_and_seal_version(server_name):
    params = small_params(1)
    plan = Plan("t", params, (20,), VectorLayout(20, params.slots), [PlanStep("square")])
    server = make_backend(params, server_name)
    spec = plan.spec(server, mask_output=False)
    assert spec.backend == server.wire_format
    assert parse_wire_format(spec.backend) == (server_name, server.seal_version)
    client = backend_for_spec(spec)
    assert client.name == server_name and client.seal_version == server.seal_version
    other = (4, 1) if server.seal_version == (4, 3) else (4, 3)
    with pytest.raises(ParamsMismatchError, match="SEAL data does not cross"):
        check_spec_backend(spec.backend, "other", other)


# -- every kernel test, re-run on Pyfhel ---------------------------------------------------------
@needs_pyfhel
class TestKernelsOnPyfhel:
    """tests/test_kernels.py runs on TenSEAL; the same functions (with their parametrizations)
    run here with `run_encrypted(..., backend_name="pyfhel")`."""

    @pytest.fixture(autouse=True)
    def _on_pyfhel(self, monkeypatch):
        used = []

        def on_pyfhel(*args, **kwargs):
            out, compiled = run_encrypted(*args, backend_name="pyfhel", **kwargs)
            used.append(compiled.backend.name)
            return out, compiled

        monkeypatch.setattr(kernel_tests, "run_encrypted", on_pyfhel)
        yield
        assert set(used) <= {"pyfhel"}


for _name, _fn in list(vars(kernel_tests).items()):
    if _name.startswith("test_") and callable(_fn):
        setattr(TestKernelsOnPyfhel, _name, staticmethod(_fn))


# -- every shipped model, encrypted end to end on both backends ----------------------------------
# Models whose plans fit n=8192 (depth <= 5) run here on every commit; the deep polynomial
# networks kept for the conformal comparison (issue 7) need n=32768 and minutes per image, and
# are measured by bench/conformal_bench.py instead.
MAX_CONTRACT_DEPTH = 5


def _zoo_names() -> list[str]:
    try:
        from heinfer_models import zoo
        from heinfer_packing.conformal import ConformalNet
        from heinfer_packing.lower import lower, plan_depth

        names = []
        for name in zoo.names():
            model = zoo.load(name)
            if isinstance(model, ConformalNet) or plan_depth(
                    lower(model).steps) <= MAX_CONTRACT_DEPTH:
                names.append(name)
        return names
    except Exception:  # noqa: BLE001 - no zoo yet: the test below says so
        return []


ZOO = _zoo_names()
N_IMAGES = 3


@pytest.fixture(scope="module")
def test_images():
    from heinfer_models import fashion_mnist

    images, labels = fashion_mnist.load("test")
    return fashion_mnist.normalize(images[:N_IMAGES]), labels[:N_IMAGES]


@pytest.mark.skipif(not ZOO, reason="no trained model under models/zoo/ yet")
@pytest.mark.parametrize("model_name", ZOO)
@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_shipped_model_encrypted_on_each_backend(test_images, model_name, backend_name):
    from heinfer_models import zoo
    from heinfer_models.evaluate import evaluate_encrypted
    from tests.test_end_to_end import LOGIT_BOUND  # the same bound for every backend

    xs, _ = test_images
    res = evaluate_encrypted(zoo.load(model_name), xs, progress=False, count_ops=False,
                             backend=backend_name)
    assert res.backend.startswith(f"{backend_name}/seal-")
    assert res.plan.params.security_bits() == 128
    assert res.max_logit_error < LOGIT_BOUND
    assert res.agreement == 1.0


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_cryptonets_shaped_model_at_128_bits_on_each_backend(test_images, backend_name):
    """Independent of the zoo's training state: a random net of the shipped CryptoNets shape
    (conv 5x5/2, square poly, dense 100, poly, dense 10), lowered at its real parameters."""
    from heinfer_models.evaluate import evaluate_encrypted
    from heinfer_packing.modelfile import Layer, Model
    from tests.test_end_to_end import LOGIT_BOUND

    rng = np.random.default_rng(0)
    poly = {"coeffs": [0.0, 0.5, 0.1]}
    model = Model("random-cryptonets", (1, 28, 28), [
        Layer("conv1", "conv2d", {"stride": 2, "padding": 1},
              rng.normal(scale=0.2, size=(5, 1, 5, 5)), rng.normal(scale=0.1, size=5)),
        Layer("act1", "poly", poly), Layer("flatten", "flatten", {}),
        Layer("fc1", "dense", {}, rng.normal(scale=845**-0.5, size=(100, 845)),
              rng.normal(scale=0.1, size=100)),
        Layer("act2", "poly", poly),
        Layer("fc2", "dense", {}, rng.normal(scale=0.1, size=(10, 100)),
              rng.normal(scale=0.1, size=10))])
    xs, _ = test_images
    res = evaluate_encrypted(model, xs[:2], progress=False, count_ops=True, backend=backend_name)
    assert res.backend.startswith(f"{backend_name}/seal-")
    assert res.plan.params.security_bits() == 128
    assert res.max_logit_error < LOGIT_BOUND
    assert res.agreement == 1.0
    assert res.op_counts["rotate"][0] > 0  # the counting wrapper works on this backend too
