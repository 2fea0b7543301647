"""Key and ciphertext checks that run in the server's workers, called in-process with real
CKKS: good keys load, every form of secret key is refused, foreign or incomplete keys are
named for what they are, and predict evaluates the plan correctly with a session's keys."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tenseal as ts

from heinfer import wire
from heinfer.backends import backend_available
from heinfer.plan import Plan
from heinfer_client.keys import LocalKeys
from heinfer_server import keycheck, workers
from heinfer_server.errors import ApiError
from tests.test_server_support import tiny_model, tiny_plan


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    path = tiny_plan(d)
    plan = Plan.load(path)
    spec = plan.spec()
    keys = LocalKeys(spec)
    return d, path, plan, spec, keys


def _job(d, path, plan, body: bytes, name: str) -> workers.KeyJob:
    upload = d / f"{name}.upload"
    upload.write_bytes(body)
    frame = wire.read_header(io.BytesIO(body), len(body), expected_kind=wire.Kind.EVAL_KEYS)
    return workers.KeyJob(str(upload), tuple((s.type.name, s.offset, s.length)
                                             for s in frame.sections),
                          str(d / f"{name}.keys"), str(path), plan.hash(), f"s_{name}xxxxxx")


def _refused(setup, body: bytes, name: str, code: str) -> str:
    d, path, plan, _, _ = setup
    with pytest.raises(ApiError) as e:
        workers.validate_keys(_job(d, path, plan, body, name))
    assert e.value.code == code, e.value.detail
    return e.value.detail


def test_good_keys_load_and_are_split_per_object(setup):
    d, path, plan, spec, keys = setup
    sizes = workers.validate_keys(_job(d, path, plan, keys.eval_keys_wire(), "good"))
    assert set(sizes) == {"RELIN_KEYS", "GALOIS_KEYS", "PUBLIC_KEY"}  # the SDK sends its pk
    assert sorted(os.listdir(d / "good.keys")) == ["galois.seal", "public.seal", "relin.seal"]
    assert (d / "good.keys" / "relin.seal").stat().st_size == sizes["RELIN_KEYS"]


def test_secret_key_in_a_relin_section_is_refused(setup):
    _, _, _, _, keys = setup
    sk = keys.secret_key_bytes()
    for section in (wire.Section.RELIN_KEYS, wire.Section.GALOIS_KEYS, wire.Section.PUBLIC_KEY):
        sections = [(wire.Section.RELIN_KEYS, sk)] if section == wire.Section.RELIN_KEYS else \
            [(wire.Section.RELIN_KEYS, sk), (section, sk)]
        body = wire.encode(wire.Kind.EVAL_KEYS, sections)
        detail = _refused(setup, body, f"sk-{section.name}", "secret_key_refused")
        assert "secret key" in detail


def test_secret_key_after_good_relin_keys_is_refused(setup):
    """The probe covers every section, not only the first."""
    d, path, plan, spec, keys = setup
    good = wire.parse_header(keys.eval_keys_wire())
    relin = wire.payloads(keys.eval_keys_wire(), good)[0]
    body = wire.encode(wire.Kind.EVAL_KEYS, [(wire.Section.RELIN_KEYS, relin),
                                             (wire.Section.GALOIS_KEYS, keys.secret_key_bytes())])
    _refused(setup, body, "sk-second", "secret_key_refused")


def test_tenseal_context_with_secret_key_is_refused(setup):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    blob = ctx.serialize(save_secret_key=True)
    f = io.BytesIO(blob)
    assert keycheck.tenseal_context_secret(f, 0, len(blob)) is True
    body = wire.encode(wire.Kind.EVAL_KEYS, [(wire.Section.RELIN_KEYS, blob)])
    _refused(setup, body, "ctx-secret", "secret_key_refused")
    public = ctx.serialize(save_secret_key=False)
    assert keycheck.tenseal_context_secret(io.BytesIO(public), 0, len(public)) is False
    body = wire.encode(wire.Kind.EVAL_KEYS, [(wire.Section.RELIN_KEYS, public)])
    assert "TenSEAL context" in _refused(setup, body, "ctx-public", "malformed_keys")


def test_proto_scanner_is_not_fooled_by_other_bytes():
    for data in (b"", b"\x0a\x05hello", os.urandom(300), b"\x5e\xa1" + b"\x00" * 40):
        assert keycheck.tenseal_context_secret(io.BytesIO(data), 0, len(data)) is None


def test_foreign_params_and_junk_and_missing_rotations(setup):
    d, path, plan, spec, keys = setup
    other = Plan.load(tiny_plan(d / "other", name="other", depth=4)).spec()
    foreign = LocalKeys(other).eval_keys_wire()
    _refused(setup, foreign, "foreign", "params_mismatch")
    junk = wire.encode(wire.Kind.EVAL_KEYS, [(wire.Section.RELIN_KEYS, os.urandom(5000))])
    _refused(setup, junk, "junk", "malformed_keys")
    partial = spec.model_copy(update={"rotation_steps": spec.rotation_steps[:2]})
    body = LocalKeys(partial).eval_keys_wire()
    detail = _refused(setup, body, "partial", "missing_keys")
    assert str(spec.rotation_steps[2]) in detail
    good = keys.eval_keys_wire()
    relin_only = wire.encode(wire.Kind.EVAL_KEYS,
                             [(wire.Section.RELIN_KEYS, wire.payloads(good, wire.parse_header(
                                 good))[0])])
    _refused(setup, relin_only, "relin-only", "missing_keys")
    swapped = wire.encode(wire.Kind.EVAL_KEYS, [
        (wire.Section.RELIN_KEYS, wire.payloads(good, wire.parse_header(good))[1]),
        (wire.Section.GALOIS_KEYS, wire.payloads(good, wire.parse_header(good))[0])])
    _refused(setup, swapped, "swapped", "missing_keys")


def test_predict_in_worker_matches_the_model(setup):
    d, path, plan, spec, keys = setup
    workers.validate_keys(_job(d, path, plan, keys.eval_keys_wire(), "p"))
    workers._SESSIONS.clear()  # force loading the key files from disk, as another worker would
    x = np.random.default_rng(3).normal(size=(1, 6, 6))
    limit = wire.ciphertext_bytes_bound(4096, plan.params.data_primes)
    job = workers.PredictJob("tiny", str(path), plan.hash(), "s_pxxxxxx", str(d / "p.keys"),
                             keys.encode_encrypt(x), 1, limit)
    out, seconds, cached = workers.predict(job)
    got = keys.decrypt_decode(out)
    assert np.abs(got - tiny_model().forward(x)).max() < 1e-2
    assert 0 < seconds < 30 and not cached
    assert workers.predict(job)[2]  # the second time from the key cache


def test_predict_refuses_wrong_ciphertexts(setup):
    d, path, plan, spec, keys = setup
    workers.validate_keys(_job(d, path, plan, keys.eval_keys_wire(), "w"))
    limit = wire.ciphertext_bytes_bound(4096, plan.params.data_primes)
    x = np.zeros((1, 6, 6))
    be = keys.backend

    def run(body: bytes) -> str:
        job = workers.PredictJob("tiny", str(path), plan.hash(), "s_wxxxxxx",
                                 str(d / "w.keys"), body, 1, limit)
        with pytest.raises(ApiError) as e:
            workers.predict(job)
        return e.value.code

    assert run(wire.encode_ciphertexts([os.urandom(3000)])) == "malformed_ciphertext"
    ct = be.encrypt(np.zeros(be.slots))
    be.mod_switch_to_inplace(ct, plan.params.top_level - 1)
    assert run(wire.encode_ciphertexts([be.ciphertext_to_bytes(ct)])) == "malformed_ciphertext"
    other = LocalKeys(Plan.load(tiny_plan(d / "o2", name="o2", depth=4)).spec())
    assert run(other.encode_encrypt(x)) == "params_mismatch"


def test_insecure_plan_refused_unless_allowed(setup):
    _, path, _, _, _ = setup
    with pytest.raises(ApiError) as e:
        workers.inspect_plan(str(path), allow_insecure=False)
    assert e.value.code == "insecure_params"
    info = workers.inspect_plan(str(path), allow_insecure=True)
    assert info.insecure and info.n_inputs == 1
    assert '"normalization"' in info.preprocessing_json
    assert tiny_model().name == info.name


def test_other_seal_versions_refused_before_loading(setup):
    """SEAL loads only its own major.minor: a key section from SEAL 4.1 (Pyfhel) is named as
    such instead of reaching SEAL's parser."""
    _, _, _, _, keys = setup
    good = keys.eval_keys_wire()
    frame = wire.parse_header(good)
    relin, galois, _public = wire.payloads(good, frame)
    patched = bytearray(relin)
    patched[4] = 1  # header minor version: "SEAL 4.1"
    body = wire.encode_eval_keys(bytes(patched), galois)
    assert "SEAL 4.1" in _refused(setup, body, "seal41", "params_mismatch")


@pytest.mark.skipif(not backend_available("pyfhel"), reason="Pyfhel (optional) not installed")
def test_real_pyfhel_client_data_refused(setup):
    d, path, plan, spec, keys = setup
    from heinfer.backends import make_backend

    pyf = make_backend(spec.params, "pyfhel")
    k = pyf.generate_keys(spec.rotation_steps)
    body = wire.encode_eval_keys(k.relin_keys, k.galois_keys)
    assert "SEAL 4.1" in _refused(setup, body, "pyfhel", "params_mismatch")
    workers.validate_keys(_job(d, path, plan, keys.eval_keys_wire(), "pyf-ok"))
    limit = wire.ciphertext_bytes_bound(4096, plan.params.data_primes)
    cts = [pyf.encrypt_to_bytes(v) for v in spec.input_layout_obj().pack(np.zeros((1, 6, 6)))]
    job = workers.PredictJob("tiny", str(path), plan.hash(), "s_pyf-okxxxxxx",
                             str(d / "pyf-ok.keys"), wire.encode_ciphertexts(cts), 1, limit)
    with pytest.raises(ApiError) as e:
        workers.predict(job)
    assert e.value.code == "params_mismatch" and "SEAL 4.1" in e.value.detail
