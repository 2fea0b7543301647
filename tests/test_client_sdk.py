"""The SDK against a real server on loopback: five lines to a correct prediction, local keys
with owner-only permissions, nothing secret on the wire, plan pinning, refusal of insecure
specs, retries and the error tree (driven by httpx.MockTransport), and import hygiene."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tenseal.sealapi as seal

from heinfer import wire
from heinfer.plan import Plan
from heinfer_client import Client, errors
from heinfer_client.keys import LocalKeys
from heinfer_client.sdk import WireLog
from tests.test_server_support import ADMIN, ALICE, BOB, running_server, tiny_model, tiny_plan

ZOO_MODEL = Path(__file__).resolve().parents[1] / "models" / "zoo" / "fmnist-cryptonets"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdk")
    with running_server(d, [tiny_plan(d / "plans")]) as s:
        s.plans = d / "plans"
        yield s


def test_five_lines_to_a_prediction(srv, tmp_path):
    c = Client(srv.url, ALICE, keystore=tmp_path, allow_insecure=True)
    m = c.model("tiny")
    s = m.session()
    x = np.random.default_rng(2).normal(size=(1, 6, 6))
    p = s.predict(x, normalized=True)
    expected = tiny_model().forward(x)
    assert np.abs(p.logits - expected).max() < 1e-2
    assert p.label == int(np.argmax(expected)) and p.label_name == ["ant", "bee", "cat"][p.label]
    assert abs(p.probabilities.sum() - 1) < 1e-9 and p.probabilities.argmax() == p.label
    assert p.bytes_sent > 0 and p.bytes_received > 0 and p.server_ms > 0 and p.seconds > 0
    assert json.dumps(p.to_dict())
    # raw pixels (uint8) are normalized with the mean/std the model publishes
    raw = np.random.default_rng(3).integers(0, 256, size=(6, 6), dtype=np.uint8)
    q = s.predict(raw)
    assert np.abs(q.logits - tiny_model().forward(((raw / 255 - 0.5) / 0.25)[None])).max() < 1e-2
    batch = s.predict_batch([x, x], concurrency=2, normalized=True)
    assert [b.label for b in batch] == [p.label, p.label]
    assert [b.label for b in s.predict_batch(np.stack([raw, raw]))] == [q.label, q.label]


def test_keystore_is_private_and_reused(srv, tmp_path):
    c = Client(srv.url, ALICE, keystore=tmp_path / "ks", allow_insecure=True)
    m = c.model("tiny")
    s1 = m.session()
    assert s1.key_upload_bytes > 0
    entry = c.keystore.entry(c.url, "tiny", m.plan_hash)
    for f in ("secret.key", "meta.json", "sessions.json"):
        assert stat.S_IMODE((entry.dir / f).stat().st_mode) == 0o600, f
    d = entry.dir
    while d != tmp_path:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        d = d.parent
    meta = json.loads((entry.dir / "meta.json").read_text())
    assert meta["plan_hash"] == m.plan_hash and ALICE not in (entry.dir / "sessions.json"
                                                              ).read_text()
    # a new client (a new process, say) reuses the secret key and the live session
    c2 = Client(srv.url, ALICE, keystore=tmp_path / "ks", allow_insecure=True)
    s2 = c2.model("tiny").session()
    assert s2.id == s1.id and s2.key_upload_bytes == 0
    x = np.ones((1, 6, 6))
    a, b = s2.predict(x, normalized=True), s1.predict(x, normalized=True)
    assert np.abs(a.logits - b.logits).max() < 1e-2
    # another API key cannot reuse it: its own session, same local secret key
    s3 = Client(srv.url, BOB, keystore=tmp_path / "ks", allow_insecure=True).model(
        "tiny").session()
    assert s3.id != s1.id and s3.key_upload_bytes > 0
    # a deleted session is replaced transparently on the next predict (new upload)
    s1.delete()
    p = s2.predict(x, normalized=True)
    assert s2.id != s1.id and p.label == s3.predict(x, normalized=True).label


def test_nothing_secret_goes_over_the_wire(srv, tmp_path):
    log = WireLog()
    c = Client(srv.url, ALICE, keystore=tmp_path, allow_insecure=True,
               transport=log.transport())
    m = c.model("tiny")
    s = m.session(reuse=False)
    s.predict(np.ones((1, 6, 6)), normalized=True)
    s.predict_batch([np.zeros((1, 6, 6))] * 2, normalized=True)
    s.delete()
    sk = c.keystore.entry(c.url, "tiny", m.plan_hash).read_secret()
    kinds = []
    be = LocalKeys(m.spec).backend  # a fresh context to probe what was sent
    for method, _url, headers, body in log.requests:
        assert headers["authorization"] == f"Bearer {ALICE}"
        for i in range(0, len(sk) - 64, 997):  # no 64-byte window of the secret key
            assert sk[i:i + 64] not in body
        if method == "POST":
            frame = wire.parse_header(body)
            kinds.append(frame.kind)
            for section, payload in zip(frame.sections, wire.payloads(body, frame), strict=True):
                assert section.type in (wire.Section.RELIN_KEYS, wire.Section.GALOIS_KEYS,
                                        wire.Section.PUBLIC_KEY, wire.Section.CIPHERTEXT)
                path = tmp_path / "probe"
                path.write_bytes(payload)
                with pytest.raises(RuntimeError):  # structurally not a secret key
                    seal.SecretKey().load(be.context, str(path))
    assert kinds.count(wire.Kind.EVAL_KEYS) == 1 and kinds.count(wire.Kind.CIPHERTEXTS) == 3


def test_insecure_spec_refused_by_default(srv, tmp_path):
    c = Client(srv.url, ALICE, keystore=tmp_path)
    with pytest.raises(errors.InsecureSpecError, match="below 128-bit"):
        c.model("tiny")
    assert not any(tmp_path.iterdir())  # no keys were made


def test_plan_change_detected(srv, tmp_path):
    admin = Client(srv.url, ADMIN)
    p1 = tiny_plan(srv.plans / "pin1", name="pinned", seed=1)
    p2 = tiny_plan(srv.plans / "pin2", name="pinned", seed=2)
    admin.add_model(p1)
    c = Client(srv.url, ALICE, keystore=tmp_path, allow_insecure=True)
    s = c.model("pinned").session()
    admin.add_model(p2, replace=True)
    with pytest.raises(errors.PlanChangedError) as e:
        s.predict(np.ones((1, 6, 6)), normalized=True)
    assert e.value.code == "plan_mismatch" and e.value.status == 409
    s2 = c.model("pinned").session()  # a fresh spec: new keys for the new plan hash
    assert s2.model.plan_hash == Plan.load(p2).hash() != s.model.plan_hash
    assert s2.predict(np.ones((1, 6, 6)), normalized=True).label in (0, 1, 2)
    admin.remove_model("pinned")
    with pytest.raises(errors.NotFoundError):
        c.model("pinned")


def test_errors_map_to_the_tree(srv):
    with pytest.raises(errors.AuthError) as e:
        Client(srv.url, "wrong-key-0123456789abc").models()
    assert e.value.code == "invalid_api_key" and e.value.request_id
    with pytest.raises(errors.NotFoundError):
        Client(srv.url, ALICE, allow_insecure=True).model("nope")
    with pytest.raises(errors.AuthError):
        Client(srv.url, ALICE).remove_model("tiny")
    with pytest.raises(errors.TransportError):
        Client("http://127.0.0.1:9", ALICE, retries=1, backoff=0.01).models()


def _mock(responses: list, seen: list):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        r = responses.pop(0)
        if isinstance(r, Exception):
            raise r
        return r
    return httpx.MockTransport(handler)


def test_retry_policy_with_a_mock_transport():
    busy = httpx.Response(503, headers={"Retry-After": "0"},
                          json={"code": "overloaded", "detail": "busy"})
    ok = httpx.Response(200, json=[])
    seen: list = []
    c = Client("http://x", "k", transport=_mock([busy, busy, ok], seen), backoff=0.001)
    assert c.models() == [] and len(seen) == 3
    # a dropped connection is retried for a safe call, not for an unsafe one
    seen.clear()
    c = Client("http://x", "k", backoff=0.001, transport=_mock(
        [httpx.ReadError("reset"), ok], seen))
    assert c.request("GET", "/v1/models", retry="safe").json() == [] and len(seen) == 2
    seen.clear()
    c = Client("http://x", "k", backoff=0.001, transport=_mock([httpx.ReadError("reset")], seen))
    with pytest.raises(errors.TransportError):
        c.request("POST", "/v1/sessions", retry="connect")
    assert len(seen) == 1
    # retries are bounded
    seen.clear()
    c = Client("http://x", "k", retries=2, backoff=0.001, transport=_mock([busy] * 3, seen))
    with pytest.raises(errors.ServerBusyError) as e:
        c.models()
    assert len(seen) == 3 and e.value.retry_after == 0


@pytest.mark.parametrize("status,code,cls", [
    (400, "secret_key_refused", errors.SecretKeyRefusedError),
    (400, "wrong_count", errors.BadRequestError),
    (401, "missing_api_key", errors.AuthError),
    (404, "unknown_session", errors.NotFoundError),
    (409, "plan_mismatch", errors.PlanChangedError),
    (410, "session_expired", errors.SessionExpiredError),
    (413, "payload_too_large", errors.PayloadTooLargeError),
    (429, "quota_exceeded", errors.QuotaExceededError),
    (500, "internal", errors.ServerError),
    (504, "timeout", errors.ServerError),
])
def test_problem_codes_map_to_exceptions(status, code, cls):
    r = httpx.Response(status, json={"code": code, "detail": "d", "request_id": "r1"})
    c = Client("http://x", "k", transport=_mock([r], []), retries=0)
    with pytest.raises(cls) as e:
        c.models()
    assert e.value.code == code and e.value.status == status and e.value.request_id == "r1"


def test_client_package_imports_no_server_or_torch():
    code = ("import sys, heinfer_client, heinfer_client.sdk, heinfer_client.cli, "
            "heinfer_client.keys, heinfer_client.keystore, heinfer_client.images, "
            "heinfer_client.local, heinfer_client.errors\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'uvicorn', "
            "'starlette', 'torch', 'heinfer_server', 'heinfer_packing', 'heinfer_models', "
            "'prometheus_client', 'pydantic_settings'})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "", out.stdout


@pytest.mark.skipif(not (ZOO_MODEL / "model.json").exists(),
                    reason="the shipped model is not trained yet")
def test_shipped_model_over_http(tmp_path):
    """The real model at n=8192 (128-bit) through the service: a few test images."""
    from heinfer_models import fashion_mnist, zoo
    from heinfer_packing.lower import lower

    model = zoo.load("fmnist-cryptonets")
    from heinfer.check import checked

    train, _ = fashion_mnist.load("train")
    plan = checked(lower(model), fashion_mnist.normalize(train[:8]), model.forward)
    plan_json = plan.save(tmp_path / "plans" / "fmnist-cryptonets")
    with running_server(tmp_path, [plan_json], allow_insecure_params="false") as s:
        c = Client(s.url, ALICE, keystore=tmp_path / "ks")
        session = c.model("fmnist-cryptonets").session()
        images, _ = fashion_mnist.load("test")
        xs = fashion_mnist.normalize(images[:2])
        for img, x in zip(images[:2], xs, strict=True):
            p = session.predict(x, normalized=True)
            assert p.label == int(np.argmax(model.forward(x)))
            # the uint8 image, normalized by the client with what the model publishes
            assert np.abs(session.predict(img).logits - p.logits).max() < 5e-2
            assert p.server_ms < 1e3 * p.seconds


def _model_info(tmp_path, backend: str) -> dict:
    from tests.test_server_support import tiny_plan as make_plan

    spec = Plan.load(make_plan(tmp_path)).spec()
    doc = json.loads(spec.model_dump_json())
    doc["backend"] = backend
    return {"name": "tiny", "plan_hash": spec.plan_hash, "spec": doc, "limits": {}}


def test_spec_for_another_backend_is_refused_before_keygen(tmp_path):
    info = _model_info(tmp_path, "tenseal/seal-4.2")  # no backend here writes SEAL 4.2
    c = Client("http://x", "k", transport=_mock([httpx.Response(200, json=info)], []),
               keystore=tmp_path / "ks", allow_insecure=True)
    with pytest.raises(errors.IncompatibleSpecError, match="SEAL 4.2"):
        c.model("tiny")
    assert not (tmp_path / "ks").exists()


def test_sdk_picks_its_backend_from_the_spec(tmp_path):
    """A model served by Pyfhel (SEAL 4.1) gets Pyfhel keys on the client, or a clear refusal
    naming Pyfhel when it is not installed: never TenSEAL keys SEAL 4.1 cannot load."""
    from heinfer.backends import backend_available

    info = _model_info(tmp_path, "pyfhel/seal-4.1")
    c = Client("http://x", "k", transport=_mock([httpx.Response(200, json=info)], []),
               keystore=tmp_path / "ks", allow_insecure=True)
    if not backend_available("pyfhel"):
        with pytest.raises(errors.IncompatibleSpecError, match="Pyfhel"):
            c.model("tiny")
        return
    model = c.model("tiny")
    keys = LocalKeys(model.spec)
    assert keys.backend.name == "pyfhel" and keys.backend.wire_format == "pyfhel/seal-4.1"
    assert wire.parse_header(keys.eval_keys_wire())
