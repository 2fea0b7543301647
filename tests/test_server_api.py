"""The HTTP API through real HTTP: a `heinfer serve` process on 127.0.0.1, real CKKS.

Every caller mistake is checked one by one for its status and stable code; then the happy paths
(spec, sessions, predict, admin), isolation between API keys, quotas, metrics, docs and logs.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tenseal as ts

from heinfer import wire
from heinfer.check import checked
from heinfer.plan import Plan
from heinfer_client.keys import LocalKeys
from tests.test_server_support import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    ct_body,
    decrypt,
    frame,
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

MAX_KEY_BYTES = 8 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    plans = [tiny_plan(d / "plans"), tiny_plan(d / "plans", name="tiny2", seed=1, depth=4)]
    with running_server(d, plans, max_key_bytes=MAX_KEY_BYTES, max_sessions_per_key=3) as srv:
        alice = http(srv.url, ALICE)
        spec = spec_of(alice, "tiny")
        keys = LocalKeys(spec)
        sid = new_session(alice, "tiny", keys)
        yield {"srv": srv, "alice": alice, "bob": http(srv.url, BOB), "spec": spec,
               "keys": keys, "sid": sid, "dir": d}
        alice.close()


# -- happy paths --------------------------------------------------------------------------------
def test_health_and_models(env):
    anon = http(env["srv"].url, None)
    assert anon.get("/v1/health/live").json() == {"status": "alive"}
    ready = anon.get("/v1/health/ready").json()
    assert ready["status"] == "ready" and ready["models"] == 2
    rows = env["alice"].get("/v1/models").json()
    assert [r["name"] for r in rows] == ["tiny", "tiny2"]
    assert "INSECURE" in rows[0]["params"] and rows[0]["security_bits"] == 0


def test_model_spec_is_public_and_complete(env):
    info = env["alice"].get("/v1/models/tiny").json()
    spec = info["spec"]
    plan = Plan.load(env["dir"] / "plans" / "tiny.plan.json")
    assert info["plan_hash"] == spec["plan_hash"] == plan.hash()
    assert spec["params"]["poly_modulus_degree"] == 4096 and spec["plan_format"] == 1
    assert spec["rotation_steps"] == plan.spec().rotation_steps
    assert spec["input_layout"]["kind"] == "grid" and spec["output"]["labels"][0] == "ant"
    assert info["limits"]["input_ciphertexts"] == 1 and info["limits"]["wire_version"] == 1
    assert info["preprocessing"] == {"normalization": {"mean": 0.5, "std": 0.25}}
    assert "weight" not in json.dumps(info)  # weights stay with the server


def test_predict_matches_plaintext_model(env):
    x = np.random.default_rng(11).normal(size=(1, 6, 6))
    r = post_predict(env["alice"], "tiny", env["sid"], ct_body(env["keys"], x))
    assert float(r.headers["x-heinfer-eval-ms"]) > 0
    got = decrypt(env["keys"], r)
    assert np.abs(got - tiny_model().forward(x)).max() < 1e-2
    # pinned plan hash accepted
    r = post_predict(env["alice"], "tiny", env["sid"], ct_body(env["keys"], x),
                     plan_hash=env["spec"].plan_hash)
    assert r.status_code == 200


def test_session_lifecycle_and_files(env):
    alice, keys = env["alice"], env["keys"]
    sid = new_session(alice, "tiny", keys)
    info = alice.get(f"/v1/sessions/{sid}").json()
    assert info["model"] == "tiny" and info["key_bytes"] > 0
    assert info["expires_at"] > info["last_used"]
    assert sid in [s["session_id"] for s in alice.get("/v1/sessions").json()]
    data = env["srv"].data_dir
    assert sorted(os.listdir(data / "sessions" / sid)) == ["galois.seal", "public.seal",
                                                           "relin.seal", "session.json"]
    assert os.listdir(data / "tmp") == []  # the streamed upload was consumed
    assert alice.delete(f"/v1/sessions/{sid}").status_code == 204
    assert not (data / "sessions" / sid).exists()
    problem(alice.get(f"/v1/sessions/{sid}"), 404, "unknown_session")


# -- authentication and isolation ------------------------------------------------------------
def test_missing_and_wrong_api_key(env):
    url = env["srv"].url
    r = http(url, None).get("/v1/models")
    problem(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    problem(http(url, "not-a-real-key-1234567890").get("/v1/models"), 401, "invalid_api_key")
    problem(http(url, None).get("/v1/models", headers={"Authorization": "Basic abc"}), 401,
            "missing_api_key")


def test_other_key_gets_404_for_a_session(env):
    bob, sid, keys = env["bob"], env["sid"], env["keys"]
    problem(bob.get(f"/v1/sessions/{sid}"), 404, "unknown_session")
    problem(bob.delete(f"/v1/sessions/{sid}"), 404, "unknown_session")
    x = np.zeros((1, 6, 6))
    problem(post_predict(bob, "tiny", sid, ct_body(keys, x)), 404, "unknown_session")
    assert sid not in [s["session_id"] for s in bob.get("/v1/sessions").json()]
    assert env["alice"].get(f"/v1/sessions/{sid}").status_code == 200  # still alice's


def test_admin_routes_need_the_admin_key(env):
    problem(env["alice"].delete("/v1/models/tiny"), 403, "admin_required")
    plan = env["dir"] / "plans" / "tiny.plan.json"
    files = {"plan_json": plan.read_bytes(), "plan_npz": plan.with_suffix(".npz").read_bytes()}
    problem(env["alice"].post("/v1/models", files=files), 403, "admin_required")


# -- caller mistakes, one by one -----------------------------------------------------------------
def test_unknown_model(env):
    alice, keys, sid = env["alice"], env["keys"], env["sid"]
    problem(alice.get("/v1/models/nope"), 404, "unknown_model")
    problem(post_keys(alice, "nope", keys.eval_keys_wire()), 404, "unknown_model")
    problem(post_predict(alice, "nope", sid, ct_body(keys, np.zeros((1, 6, 6)))), 404,
            "unknown_model")
    problem(alice.get("/v1/models/..%2F..%2Fetc"), 404, "not_found")  # no such route
    problem(alice.get("/v1/models/.hidden"), 404, "unknown_model")


def test_unknown_session(env):
    x = ct_body(env["keys"], np.zeros((1, 6, 6)))
    problem(post_predict(env["alice"], "tiny", "s_doesnotexist123", x), 404, "unknown_session")
    problem(post_predict(env["alice"], "tiny", "../../etc/passwd", x), 404, "unknown_session")


def test_wrong_count_kind_and_malformed_bodies(env):
    alice, keys, sid = env["alice"], env["keys"], env["sid"]
    one = wire.payloads(b := ct_body(keys, np.zeros((1, 6, 6))), wire.parse_header(b))[0]
    problem(post_predict(alice, "tiny", sid, frame(one, one)), 400, "wrong_count")
    relin_only = wire.encode(wire.Kind.EVAL_KEYS, [(wire.Section.RELIN_KEYS, one)])
    problem(post_predict(alice, "tiny", sid, relin_only), 400, "wrong_kind")
    problem(post_keys(alice, "tiny", b), 400, "wrong_kind")
    problem(post_predict(alice, "tiny", sid, os.urandom(5000)), 400, "malformed_body")
    problem(post_predict(alice, "tiny", sid, b[:-10]), 400, "malformed_body")
    problem(post_predict(alice, "tiny", sid, frame(os.urandom(4000))), 400,
            "malformed_ciphertext")
    problem(post_keys(alice, "tiny", b"\x00" * 100), 400, "malformed_body")


def test_wrong_parameters(env):
    alice, sid = env["alice"], env["sid"]
    other = LocalKeys(spec_of(alice, "tiny2"))
    problem(post_predict(alice, "tiny", sid, other.encode_encrypt(np.zeros((1, 6, 6)))), 400,
            "params_mismatch")
    problem(post_keys(alice, "tiny", other.eval_keys_wire()), 400, "params_mismatch")
    other_sid = new_session(alice, "tiny2", other)
    problem(post_predict(alice, "tiny", other_sid, ct_body(env["keys"], np.zeros((1, 6, 6)))),
            400, "session_model_mismatch")
    alice.delete(f"/v1/sessions/{other_sid}")


def test_wrong_shape_is_caught_on_the_client(env):
    from heinfer.errors import LayoutError

    with pytest.raises(LayoutError, match="shape"):
        env["keys"].encode_encrypt(np.zeros((1, 5, 5)))


def test_plan_hash_pinning(env):
    alice, keys, sid = env["alice"], env["keys"], env["sid"]
    problem(post_keys(alice, "tiny", keys.eval_keys_wire(), plan_hash="0123abcd"), 409,
            "plan_mismatch")
    problem(post_predict(alice, "tiny", sid, ct_body(keys, np.zeros((1, 6, 6))),
                         plan_hash="0123abcd"), 409, "plan_mismatch")


def test_oversized_bodies(env):
    alice, sid = env["alice"], env["sid"]
    limit = alice.get("/v1/models/tiny").json()["limits"]["max_predict_body_bytes"]
    problem(post_predict(alice, "tiny", sid, b"\x00" * (limit + 1)), 413, "payload_too_large")
    problem(post_keys(alice, "tiny", b"\x00" * (MAX_KEY_BYTES + 1)), 413, "payload_too_large")

    def chunked():  # no Content-Length: the limit is enforced while streaming (the start of a
        yield b"\x0a\x4a\x5e\xa1"  # TenSEAL context lets the body past the first-bytes check)
        for _ in range(MAX_KEY_BYTES // (1 << 20) + 2):
            yield b"\x00" * (1 << 20)

    problem(post_keys(alice, "tiny", chunked()), 413, "payload_too_large")
    assert os.listdir(env["srv"].data_dir / "tmp") == []


def test_media_type_and_validation(env):
    alice, keys, sid = env["alice"], env["keys"], env["sid"]
    body = ct_body(keys, np.zeros((1, 6, 6)))
    problem(post_predict(alice, "tiny", sid, body, content_type="application/json"), 415,
            "unsupported_media_type")
    problem(alice.post("/v1/models/tiny/predict", content=body,
                       headers={"Content-Type": "application/octet-stream"}), 422,
            "validation_error")
    problem(alice.get("/v1/nothing-here"), 404, "not_found")
    problem(alice.put("/v1/models"), 405, "method_not_allowed")


def test_secret_key_uploads_refused_and_not_kept(env):
    alice, keys = env["alice"], env["keys"]
    sk = keys.secret_key_bytes()
    typed = wire.HEADER.pack(wire.MAGIC, 1, 2, 1, 0) + wire.ENTRY.pack(15, 0, 0, len(sk)) + sk
    problem(post_keys(alice, "tiny", typed), 400, "secret_key_refused")
    wrapped = wire.encode(wire.Kind.EVAL_KEYS, [(wire.Section.RELIN_KEYS, sk)])
    problem(post_keys(alice, "tiny", wrapped), 400, "secret_key_refused")
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    blob = ctx.serialize(save_secret_key=True)
    problem(post_keys(alice, "tiny", blob), 400, "secret_key_refused")
    problem(post_keys(alice, "tiny", wire.encode(wire.Kind.EVAL_KEYS,
                                                 [(wire.Section.RELIN_KEYS, blob)])), 400,
            "secret_key_refused")
    # nothing of the refused uploads stays anywhere under the data directory
    needle = sk[100:164]
    for root, _, files in os.walk(env["srv"].data_dir):
        for f in files:
            if f.startswith("heinfer.db"):
                continue
            assert needle not in open(os.path.join(root, f), "rb").read(), f


def test_missing_rotation_keys(env):
    spec = env["spec"]
    partial = LocalKeys(spec.model_copy(update={"rotation_steps": spec.rotation_steps[:1]}))
    body = problem(post_keys(env["alice"], "tiny", partial.eval_keys_wire()), 400,
                   "missing_keys")
    assert "rotation step" in body["detail"]


def test_session_quota(env):
    carol = http(env["srv"].url, CAROL)
    keys = env["keys"]
    sids = [new_session(carol, "tiny", keys) for _ in range(3)]
    problem(post_keys(carol, "tiny", keys.eval_keys_wire()), 429, "quota_exceeded")
    carol.delete(f"/v1/sessions/{sids[0]}")
    sids[0] = new_session(carol, "tiny", keys)  # room again
    for s in sids:
        carol.delete(f"/v1/sessions/{s}")


# -- admin ---------------------------------------------------------------------------------------
def test_add_replace_remove_model(env):
    admin, alice = http(env["srv"].url, ADMIN), env["alice"]
    plans = env["dir"] / "plans"
    p1 = tiny_plan(plans / "m1", name="extra", seed=5)
    p2 = tiny_plan(plans / "m2", name="extra", seed=6)

    def upload(path, **params):
        return admin.post("/v1/models", params=params, files={
            "plan_json": path.read_bytes(), "plan_npz": path.with_suffix(".npz").read_bytes()})

    r = upload(p1)
    assert r.status_code == 201 and r.json()["name"] == "extra"
    assert upload(p1).status_code == 200  # same plan again: nothing to do
    problem(upload(p2), 409, "model_exists")
    keys = LocalKeys(spec_of(alice, "extra"))
    sid = new_session(alice, "extra", keys)
    r = upload(p2, replace="true")
    assert r.status_code == 201 and r.json()["plan_hash"] == Plan.load(p2).hash()
    problem(post_predict(alice, "extra", sid, ct_body(keys, np.zeros((1, 6, 6)))), 409,
            "plan_mismatch")
    assert upload(p1, name="extra-copy").json()["spec"]["name"] == "extra-copy"
    assert admin.delete("/v1/models/extra").status_code == 204
    problem(alice.get("/v1/models/extra"), 404, "unknown_model")
    problem(alice.get(f"/v1/sessions/{sid}"), 404, "unknown_session")
    assert not (env["srv"].data_dir / "models" / "extra").exists()
    assert not (env["srv"].data_dir / "sessions" / sid).exists()
    admin.delete("/v1/models/extra-copy")
    problem(admin.delete("/v1/models/extra"), 404, "unknown_model")


def test_plan_with_a_key_budget_is_served_with_its_keys_only(env):
    """A budgeted plan's spec lists only its keyed steps; a session with keys for exactly those
    predicts (the worker composes the other rotations) and matches the plaintext model."""
    admin, alice = http(env["srv"].url, ADMIN), env["alice"]
    plan = Plan.load(tiny_plan(env["dir"] / "plans" / "kb", name="budget"))
    natural = plan.spec().rotation_steps
    budgeted = plan.with_key_budget(2)
    assert "check" not in budgeted.metadata  # composed rotations: its own check is needed
    unchecked = {"plan_json": budgeted.save(env["dir"] / "plans" / "kb" / "unchecked")
                 .read_bytes(),
                 "plan_npz": (env["dir"] / "plans" / "kb" / "unchecked.plan.npz").read_bytes()}
    body = problem(admin.post("/v1/models", files=unchecked), 400, "unchecked_plan")
    assert "heinfer verify" in body["detail"] and "--force" in body["detail"]
    # the admin may force it
    r = admin.post("/v1/models", params={"force": "true", "name": "forced"}, files=unchecked)
    assert r.status_code == 201, r.text
    assert admin.delete("/v1/models/forced").status_code == 204
    model = tiny_model("budget")
    xs = np.random.default_rng(1).uniform(-1, 1, (8, *model.input_shape))
    path = checked(budgeted, xs, model.forward).save(env["dir"] / "plans" / "kb" / "budget")
    r = admin.post("/v1/models", files={"plan_json": path.read_bytes(),
                                        "plan_npz": path.with_suffix(".npz").read_bytes()})
    assert r.status_code == 201, r.text
    try:
        spec = spec_of(alice, "budget")
        assert len(spec.rotation_steps) <= 2 < len(natural)
        keys = LocalKeys(spec)
        assert keys.backend.rotation_steps == set(spec.rotation_steps)
        sid = new_session(alice, "budget", keys)
        x = np.random.default_rng(12).normal(size=(1, 6, 6))
        got = decrypt(keys, post_predict(alice, "budget", sid, ct_body(keys, x)))
        assert np.abs(got - tiny_model("budget").forward(x)).max() < 1e-2
    finally:
        assert admin.delete("/v1/models/budget").status_code == 204


def test_bad_plan_uploads(env):
    admin = http(env["srv"].url, ADMIN)
    problem(admin.post("/v1/models", files={"plan_json": b"{}", "plan_npz": b"x"}), 400,
            "invalid_plan")
    problem(admin.post("/v1/models", files={"plan_json": b"{}"}), 400, "invalid_plan")
    plan = env["dir"] / "plans" / "tiny.plan.json"
    files = {"plan_json": plan.read_bytes(), "plan_npz": plan.with_suffix(".npz").read_bytes()}
    problem(admin.post("/v1/models", params={"name": "Bad Name!"}, files=files), 400,
            "invalid_name")


# -- observability -------------------------------------------------------------------------------
def test_metrics_docs_request_ids_and_logs(env):
    alice = env["alice"]
    r = alice.get("/v1/models/tiny", headers={"X-Request-Id": "my-req-42"})
    assert r.headers["x-request-id"] == "my-req-42"
    x = ct_body(env["keys"], np.zeros((1, 6, 6)))
    assert post_predict(alice, "tiny", env["sid"], x).status_code == 200
    problem(http(env["srv"].url, None).get("/metrics"), 401, "missing_api_key")  # by default
    text = alice.get("/metrics").text
    assert ('heinfer_http_requests_total{method="POST",route="/v1/models/{name}/predict",'
            'status="200"}') in text
    assert 'route="/v1/models/{name}/predict",status="404"' in text
    for name in ("heinfer_http_request_duration_seconds_bucket", "heinfer_queue_depth",
                 "heinfer_he_evaluation_seconds_count", "heinfer_sessions_active",
                 "heinfer_body_bytes_received_total"):
        assert name in text, name
    docs = http(env["srv"].url, None).get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    openapi = http(env["srv"].url, None).get("/openapi.json").json()
    assert {"/v1/sessions", "/v1/models/{name}/predict", "/v1/models/{name}",
            "/v1/health/ready"} <= set(openapi["paths"])
    lines = [json.loads(ln) for ln in env["srv"].log(200_000).splitlines()
             if ln.startswith("{")]
    mine = [ln for ln in lines if ln.get("request_id") == "my-req-42"]
    assert mine and mine[0]["route"] == "/v1/models/{name}" and mine[0]["status"] == 200
    assert ALICE not in env["srv"].log(200_000)  # keys never logged


def test_large_bodies_spill_to_a_private_file(tmp_path):
    import os
    import stat

    from heinfer_server.api.routes.predict import SPILL_BYTES, spill_body
    from heinfer_server.shred import ram_spill_dir

    spill = ram_spill_dir(tmp_path)
    assert spill_body(b"x" * 1000, spill) is None  # small bodies go through the pool's pipe
    body = os.urandom(SPILL_BYTES + 1)
    path = spill_body(body, spill)
    try:
        assert path is not None and open(path, "rb").read() == body
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(spill).st_mode) == 0o700
    finally:
        os.unlink(path)
        os.rmdir(spill)
