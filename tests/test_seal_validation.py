"""Exact validation before SEAL and secret-key refusal by structure, over HTTP against a real
`heinfer serve` (issue #12, items 1 and 3): each SEAL field the server relies on, mutated alone
in a real ciphertext or key set (tests/seal_mutate.py), answers a 4xx with its code and one log
line; a secret key hidden in any polynomial of any object is refused and not kept; bad plan
uploads are invalid_plan; a full disk is 507; leftovers of a kill -9 are overwritten."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from heinfer import wire
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer, heinfer_command
from tests import seal_mutate as sm
from tests.test_server_support import (
    ADMIN,
    ALICE,
    ct_body,
    http,
    new_session,
    post_keys,
    post_predict,
    problem,
    running_server,
    server_env,
    spec_of,
    tiny_plan,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("sealval")
    with running_server(d, [tiny_plan(d / "plans")]) as srv:
        alice = http(srv.url, ALICE)
        keys = LocalKeys(spec_of(alice, "tiny"))
        sid = new_session(alice, "tiny", keys)
        be = keys.backend
        primes = [m.value() for m in be.context.key_context_data().parms().coeff_modulus()]
        levels, data = [], be.context.first_context_data()
        while data is not None:
            levels.append(struct.pack("<4Q", *data.parms_id()))
            data = data.next_context_data()
        good = keys.eval_keys_wire()
        relin, galois = wire.payloads(good, wire.parse_header(good))[:2]  # then PUBLIC_KEY
        yield {"srv": srv, "alice": alice, "keys": keys, "sid": sid, "primes": primes,
               "levels": levels, "relin": relin, "galois": galois, "dir": d,
               "sk": sm.secret_key_words(keys.secret_key_bytes())}
        alice.close()


def _ct(env) -> bytes:
    return wire.payloads(b := ct_body(env["keys"], np.zeros((1, 6, 6))), wire.parse_header(b))[0]


def _predict(env, item: bytes) -> httpx.Response:
    return post_predict(env["alice"], "tiny", env["sid"], wire.encode_ciphertexts([item]))


# -- predict: every field exact ---------------------------------------------------------------
def _mutations(env) -> list[tuple[str, bytes, int, str]]:
    ct = _ct(env)
    m = sm.members(ct)
    scale = sm.get_field(m, "scale")
    n, k = sm.get_field(m, "degree"), sm.get_field(m, "primes")
    out = [("uncompressed copy (control)", sm.pack(m), 200, "")]
    for name, value, code in [
        ("size", 0, "malformed_ciphertext"), ("size", 3, "malformed_ciphertext"),
        ("scale", float(np.nextafter(scale, np.inf)), "malformed_ciphertext"),
        ("scale", float(np.nextafter(scale, 0)), "malformed_ciphertext"),
        ("scale", float("nan"), "malformed_ciphertext"),
        ("ntt", 0, "malformed_ciphertext"), ("correction", 2, "malformed_ciphertext"),
        ("degree", n // 2, "params_mismatch"), ("primes", k - 1, "params_mismatch"),
        ("parms_id", env["levels"][1], "malformed_ciphertext"),  # one level down
        ("parms_id", os.urandom(32), "params_mismatch"),
        ("data_count", 0, "malformed_ciphertext"),
    ]:
        out.append((f"{name}={value!r}", sm.ciphertext(ct, **{name: value}), 400, code))
    out.append(("SEAL 4.1 header", sm.pack(m, version=(4, 1)), 400, "params_mismatch"))
    out.append(("truncated", sm.pack(m[:-9]), 400, "malformed_ciphertext"))
    out.append(("trailing byte", sm.pack(m + b"\0"), 400, "malformed_ciphertext"))
    out.append(("corrupt zstd", ct[:40] + bytes(len(ct) - 40), 400, "malformed_ciphertext"))
    out.append(("zlib junk", sm.pack(b"\x78\x9c" + os.urandom(64), compr=1), 400,
                "malformed_ciphertext"))
    unreduced = sm.write_words(bytearray(m), sm.DATA_WORDS, np.array([env["primes"][0]]))
    out.append(("coefficient = q", sm.pack(unreduced), 400, "malformed_ciphertext"))
    # a secret key's words (its first k primes) written over the stored polynomial
    hidden = sm.write_words(bytearray(m), sm.DATA_WORDS, env["sk"][: k * n])
    out.append(("secret key as c0", sm.pack(hidden), 400, "secret_key_refused"))
    one = sm.write_words(bytearray(m), sm.DATA_WORDS + 8 * n, env["sk"][n : 2 * n])
    out.append(("secret key in one RNS component", sm.pack(one, compr=2), 400,
                "secret_key_refused"))
    zero = sm.write_words(bytearray(m), sm.DATA_WORDS, np.zeros(n * k, np.uint64))
    out.append(("zero c0", sm.pack(zero), 400, "secret_key_refused"))
    return out


def test_predict_ciphertext_fields_are_checked_exactly(env):
    for what, item, status, code in _mutations(env):
        r = _predict(env, item)
        if status == 200:
            assert r.status_code == 200, (what, r.text)
        else:
            assert problem(r, status, code), what


# -- keys: every field exact, every polynomial not short -------------------------------------
def _keys_body(relin: bytes, galois: bytes | None = None, public: bytes | None = None) -> bytes:
    sections = [(wire.Section.RELIN_KEYS, relin)]
    if galois is not None:
        sections.append((wire.Section.GALOIS_KEYS, galois))
    if public is not None:
        sections.append((wire.Section.PUBLIC_KEY, public))
    return wire.encode(wire.Kind.EVAL_KEYS, sections)


def test_key_fields_are_checked_exactly_and_secret_keys_refused_by_structure(env):
    alice, relin, galois, sk = env["alice"], env["relin"], env["galois"], env["sk"]
    n, kk = env["keys"].spec.params.poly_modulus_degree, len(env["primes"])
    before = alice.get("/v1/sessions").json()
    rm = sm.members(relin)
    parts = sm.key_parts(rm)
    assert len(parts) == kk - 1 and parts[0].count == n * kk  # seeded: one polynomial each

    ok = post_keys(alice, "tiny", _keys_body(sm.pack(rm), galois))
    assert ok.status_code == 201, ok.text  # an uncompressed copy is fine (control)
    alice.delete(f"/v1/sessions/{ok.json()['session_id']}")

    first_size0 = sm.set_field(bytearray(rm), "size", 0, parts[0].base)
    problem(post_keys(alice, "tiny", _keys_body(sm.pack(first_size0), galois)), 400,
            "malformed_keys")
    scale2 = sm.set_field(bytearray(rm), "scale", 2.0, parts[1].base)
    problem(post_keys(alice, "tiny", _keys_body(sm.pack(scale2), galois)), 400,
            "malformed_keys")
    # the case: a secret key over the last polynomial of uncompressed relin keys
    last = sm.write_words(bytearray(rm), parts[-1].words, sk)
    body = problem(post_keys(alice, "tiny", _keys_body(sm.pack(last), galois)), 400,
                   "secret_key_refused")
    assert "short polynomial" in body["detail"]
    # one RNS component only, compressed as SEAL does
    one = sm.write_words(bytearray(rm), parts[1].words + 8 * n * 2, sk[2 * n : 3 * n])
    problem(post_keys(alice, "tiny", _keys_body(sm.pack(one, compr=2), galois)), 400,
            "secret_key_refused")
    # inside the Galois keys
    gm = sm.members(galois)
    gparts = sm.key_parts(gm)
    hidden = sm.write_words(bytearray(gm), gparts[len(gparts) // 2].words, sk)
    problem(post_keys(alice, "tiny", _keys_body(relin, sm.pack(hidden))), 400,
            "secret_key_refused")
    # a PUBLIC_KEY section carrying it (a public key is a ciphertext at the key level)
    pk = bytearray(rm[parts[0].header + 16 : parts[1].header])
    ok_pk = post_keys(alice, "tiny", _keys_body(relin, galois, sm.pack(pk)))
    assert ok_pk.status_code == 201, ok_pk.text  # a real public-key-shaped object passes
    alice.delete(f"/v1/sessions/{ok_pk.json()['session_id']}")
    pk_sk = sm.write_words(bytearray(pk), sm.DATA_WORDS, sk)
    problem(post_keys(alice, "tiny", _keys_body(relin, galois, sm.pack(pk_sk))), 400,
            "secret_key_refused")
    # a real public key (what the output re-randomization needs) passes; its first
    # polynomial replaced by the secret key does not
    import tempfile

    import tenseal.sealapi as seal

    real = seal.PublicKey()
    seal.KeyGenerator(env["keys"].backend.context).create_public_key(real)
    with tempfile.TemporaryDirectory() as tmp:
        real.save(f"{tmp}/pk")
        real_pk = sm.members(Path(f"{tmp}/pk").read_bytes())
    ok_real = post_keys(alice, "tiny", _keys_body(relin, galois, sm.pack(real_pk, compr=2)))
    assert ok_real.status_code == 201, ok_real.text
    alice.delete(f"/v1/sessions/{ok_real.json()['session_id']}")
    real_sk = sm.write_words(bytearray(real_pk), sm.DATA_WORDS, sk)
    problem(post_keys(alice, "tiny", _keys_body(relin, galois, sm.pack(real_sk))), 400,
            "secret_key_refused")
    # a bare SecretKey in any section
    problem(post_keys(alice, "tiny", _keys_body(env["keys"].secret_key_bytes(), galois)), 400,
            "secret_key_refused")
    # nothing of the refused uploads is kept
    assert alice.get("/v1/sessions").json() == before
    assert os.listdir(env["srv"].data_dir / "tmp") == []


def test_client_errors_log_one_line_without_traceback(env):
    _predict(env, sm.ciphertext(_ct(env), size=0))
    log = env["srv"].log(2_000_000)
    assert "Traceback" not in log and '"exc"' not in log
    lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
    bad = [ln for ln in lines if ln.get("status") == 400]
    assert bad and all(ln.get("request_id") for ln in bad)


# -- plan uploads -----------------------------------------------------------------------------
def test_plan_uploads_are_read_strictly(env):
    admin = http(env["srv"].url, ADMIN)
    plan = env["dir"] / "plans" / "tiny.plan.json"
    js, npz = plan.read_bytes(), plan.with_suffix(".npz").read_bytes()
    doc = json.loads(js)

    def upload(j: bytes, z: bytes) -> dict:
        r = admin.post("/v1/models", params={"name": "strict"},
                       files={"plan_json": j, "plan_npz": z})
        body = problem(r, 400, "invalid_plan")
        assert str(env["srv"].data_dir) not in body["detail"] and "/tmp" not in body["detail"]
        return body

    assert "UTF-8" in upload(b"\xff\xfe{" + js, npz)["detail"]
    assert "npz" in upload(js, b"PK\x03\x04" + os.urandom(200))["detail"]
    assert "npz" in upload(js, os.urandom(300))["detail"]
    for const in ("NaN", "Infinity", "-Infinity"):
        doc2 = dict(doc, metadata={**doc.get("metadata", {}), "normalization":
                                   {"mean": "X", "std": 0.25}})
        text = json.dumps(doc2).replace('"X"', const).encode()
        assert const in upload(text, npz)["detail"]
    import io

    arrays = dict(np.load(io.BytesIO(npz)))
    name = next(k for k, a in arrays.items() if a.dtype.kind == "f")
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.inf
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    assert "NaN or Infinity" in upload(js, buf.getvalue())["detail"]
    assert admin.get("/v1/models/strict").status_code == 404


# -- a full disk is 507 -----------------------------------------------------------------------
def _small_tmp_command(size: str) -> list[str] | None:
    """`heinfer serve` with DATA/tmp on a tmpfs of `size` in a mount namespace of its own
    (unshare: as root, or as a user where unprivileged user namespaces are allowed), so the
    host is untouched; None where that is impossible."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = 'mkdir -p "$1" && mount -t tmpfs -o size=' + size + ' tmpfs "$1" && shift && ' \
             'exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


def test_key_upload_on_a_full_disk_is_507(tmp_path):
    prefix = _small_tmp_command("256k")
    if prefix is None:
        pytest.skip("needs a mount namespace (unshare) for a small tmpfs upload folder")
    data = tmp_path / "data"
    srv = LocalServer(data, env=server_env(), args=["--plan", str(tiny_plan(tmp_path / "p"))],
                      command=[*prefix, str(data / "tmp"), *heinfer_command(), "serve"])
    srv.start()
    try:
        alice = http(srv.url, ALICE)
        keys = LocalKeys(spec_of(alice, "tiny"))
        r = post_keys(alice, "tiny", keys.eval_keys_wire())  # 1.3 MB into 256 KB
        body = problem(r, 507, "insufficient_storage")
        assert "Errno" not in body["detail"] and r.headers["retry-after"]
        assert "Traceback" not in srv.log(200_000)
        # the partial upload is gone (seen through the server's own mount namespace)
        assert os.listdir(f"/proc/{srv.proc.pid}/root{data / 'tmp'}") == []
        assert alice.get("/v1/health/ready").status_code == 200
    finally:
        srv.stop()


def test_a_full_database_is_507_too(tmp_path):
    """SQLite reports a full disk as SQLITE_FULL, not ENOSPC: the same 507, not a 500."""
    import errno
    import sqlite3

    from heinfer_server.errors import classify

    db = sqlite3.connect(tmp_path / "x.db")
    db.execute("PRAGMA max_page_count = 2")  # a real SQLITE_FULL, as on a full disk
    db.execute("CREATE TABLE t (x BLOB)")
    with pytest.raises(sqlite3.OperationalError) as full:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (?)", (bytes(4000),))
    assert classify(full.value).status == 507
    assert classify(OSError(errno.ENOSPC, "No space left on device")).status == 507
    assert classify(sqlite3.OperationalError("no such table: x")).status == 500


# -- kill -9: refused or unfinished uploads are overwritten at the next start -----------------
def test_upload_left_by_kill_9_is_overwritten_at_next_start(tmp_path):
    plan = tiny_plan(tmp_path / "plans")
    srv = LocalServer(tmp_path / "data", env=server_env(), args=["--plan", str(plan)])
    srv.start()
    try:
        alice = http(srv.url, ALICE)
        keys = LocalKeys(spec_of(alice, "tiny"))
        secret = keys.secret_key_bytes()
        body = _keys_body(secret + bytes(4096))  # never complete: the server is killed first
        started = threading.Event()

        def slow():
            yield body[: len(body) // 2]
            started.set()
            time.sleep(30)
            yield body[len(body) // 2 :]

        t = threading.Thread(target=lambda: _swallow(post_keys, alice, "tiny", slow()),
                             daemon=True)
        t.start()
        assert started.wait(10)
        tmp = srv.data_dir / "tmp"
        deadline = time.monotonic() + 10
        while not any(tmp.glob("*.upload")) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = next(tmp.glob("*.upload"))
        time.sleep(0.3)  # the first half is on disk
        srv.kill()
        witness = tmp_path / "witness"  # a second name for the same bytes
        os.link(left, witness)
        assert secret[:4096] in witness.read_bytes()
        srv = LocalServer(tmp_path / "data", env=server_env(), port=srv.port,
                          args=["--plan", str(plan)])
        srv.start()
        assert not left.exists()
        data = witness.read_bytes()
        assert data and data == bytes(len(data))  # overwritten with zeros before the unlink
    finally:
        srv.stop()


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except httpx.HTTPError:
        pass


# -- the short test itself, at the fmnist-cryptonets parameters (in process) ------------------
@pytest.mark.parametrize("n,bits,scale", [(8192, [51, 29, 29, 29, 29, 51], 29),
                                          (4096, [30, 20, 24, 30], 20)])
def test_short_test_at_real_parameters(n, bits, scale):
    """n = 8192 with 51- and 29-bit primes (the fmnist-cryptonets parameters: two row limbs and
    one, 8 samples), and small 20/24-bit primes (24 and 16 samples): a real secret key is short
    in every RNS component (NTT form), so is its coefficient form and a small error; uniformly
    random components never are."""
    from heinfer.backends.tenseal_backend import TensealBackend
    from heinfer.params import CKKSParams
    from heinfer_server import seal_format as sf

    params = (CKKSParams(poly_modulus_degree=n, coeff_mod_bits=bits, scale_bits=scale)
              if n == 8192 else CKKSParams.insecure_for_tests(n, bits, scale))
    be = TensealBackend(params)
    be.generate_keys([])
    e = sf.Expect.of_backend(be, params.scale)
    n, primes = e.n, e.key_primes
    sk = sm.secret_key_words(be.secret_key_bytes()).reshape(len(primes), n)
    rng = np.random.default_rng(7)
    ternary = rng.integers(-1, 2, n)
    error = np.clip(np.round(rng.normal(0, 3.2, n)), -19, 19).astype(np.int64)
    assert {e.short.samples_for(q) for q in primes} == ({8} if n == 8192 else {24, 16, 8})
    for j, q in enumerate(primes):
        uniform = rng.integers(0, q, size=(64, n), dtype=np.uint64)
        assert not e.short.short_rows(uniform, q).any()
        rows = np.stack([sk[j], (ternary % q).astype(np.uint64), (error % q).astype(np.uint64),
                         np.zeros(n, np.uint64)])
        assert e.short.short_rows(rows, q).all(), q
