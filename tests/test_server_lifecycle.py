"""The server over time, through real HTTP: kill -9 and restart with sessions intact, idle
expiry, time limits and storage quotas, a burst that fills the queue (503 + Retry-After,
accepted requests all correct), and idle workers killed (more in test_server_isolation.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from heinfer_client import Client
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer
from tests.test_server_support import (
    ALICE,
    ct_body,
    decrypt,
    http,
    new_session,
    post_keys,
    post_predict,
    problem,
    running_server,
    server_env,
    spec_of,
    tiny_model,
    tiny_plan,
)


def _group_alive(pgid: int) -> list[int]:
    """Processes still in the server's process group (its pool workers)."""
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid:
                    alive.append(int(pid))
            except (ProcessLookupError, PermissionError):
                pass
    return alive


def test_kill_9_mid_request_then_restart_keeps_models_and_sessions(tmp_path):
    plan = tiny_plan(tmp_path / "plans")
    srv = LocalServer(tmp_path / "data", env=server_env(), args=["--plan", str(plan)])
    srv.start()
    try:
        client = Client(srv.url, ALICE, keystore=tmp_path / "ks", allow_insecure=True,
                        retries=8, backoff=0.2, refused_wait=60)
        session = client.model("tiny").session()
        x = np.random.default_rng(5).normal(size=(1, 6, 6))
        expected = tiny_model().forward(x)
        assert np.abs(session.predict(x, normalized=True).logits - expected).max() < 1e-2
        body = session.encode_encrypt(x, normalized=True)

        # a predict whose body is still arriving when the server is killed
        reading = threading.Event()
        outcome: list[object] = []

        def slow_body():
            yield body[:1000]
            reading.set()
            time.sleep(1.5)
            yield body[1000:]

        def send():
            try:
                outcome.append(post_predict(http(srv.url), "tiny", session.id, slow_body()))
            except httpx.TransportError as e:
                outcome.append(e)

        t = threading.Thread(target=send)
        t.start()
        assert reading.wait(10)
        time.sleep(0.3)
        pgid = srv.proc.pid
        srv.kill()  # kill -9 of the API process only
        t.join(15)
        assert outcome and isinstance(outcome[0], httpx.TransportError)
        deadline = time.monotonic() + 10  # orphaned workers notice and exit by themselves
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_alive(pgid) == []

        # the SDK's predict, sent while the server is down, retries until it is back (asked
        # for with refused_wait: by default a refused connection is reported at once)
        result: list[object] = []
        th = threading.Thread(target=lambda: result.append(session.predict(x, normalized=True)))
        th.start()
        time.sleep(0.5)
        restarted = LocalServer(tmp_path / "data", env=server_env(), port=srv.port,
                                args=["--plan", str(plan)])
        restarted.start()
        srv = restarted
        th.join(60)
        assert result and np.abs(result[0].logits - expected).max() < 1e-2
        # same session id, no new upload, nothing left over from the killed request
        assert result[0] is not None and session.key_upload_bytes > 0
        assert http(srv.url).get(f"/v1/sessions/{session.id}").status_code == 200
        assert os.listdir(srv.data_dir / "tmp") == []
        assert [m["name"] for m in client.models()] == ["tiny"]
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    plan = tiny_plan(d / "plans")
    with running_server(d, [plan], session_idle_ttl_s=2, sweep_interval_s=0.5,
                        request_timeout_s=0.001, max_bytes_per_key=5 << 20) as srv:
        alice = http(srv.url, ALICE)
        yield srv, alice, LocalKeys(spec_of(alice, "tiny"))


def test_time_limit_answers_504(limited):
    srv, alice, keys = limited
    sid = new_session(alice, "tiny", keys)  # key checks have their own, longer limit
    problem(post_predict(alice, "tiny", sid, ct_body(keys, np.zeros((1, 6, 6)))), 504,
            "timeout")
    alice.delete(f"/v1/sessions/{sid}")


def test_storage_quota(limited):
    """Sessions are accepted while their keys fit the 5 MB quota, then refused (429); the
    key-set size is read from the answers, so the test holds whatever the wire format weighs."""
    srv, alice, keys = limited
    body, stored, sids = keys.eval_keys_wire(), 0, []
    for _ in range(8):
        r = post_keys(alice, "tiny", body)
        if r.status_code != 201:
            break
        sids.append(r.json()["session_id"])
        stored += r.json()["key_bytes"]
    problem(r, 429, "quota_exceeded")
    assert sids and stored <= 5 << 20 < stored + len(body), (stored, len(body))
    for sid in sids:
        alice.delete(f"/v1/sessions/{sid}")


def test_idle_sessions_expire_and_their_files_go(limited):
    srv, alice, keys = limited
    sid = new_session(alice, "tiny", keys)
    key_dir = srv.data_dir / "sessions" / sid
    assert key_dir.exists()
    deadline = time.monotonic() + 10
    while key_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not key_dir.exists()
    problem(alice.get(f"/v1/sessions/{sid}"), 410, "session_expired")
    problem(post_predict(alice, "tiny", sid, ct_body(keys, np.zeros((1, 6, 6)))), 410,
            "session_expired")
    assert 'heinfer_sessions_active 0.0' in http(srv.url).get("/metrics").text


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    d = tmp_path_factory.mktemp("busy")
    with running_server(d, [tiny_plan(d / "plans")], workers=1, max_queue=1) as srv:
        alice = http(srv.url, ALICE)
        keys = LocalKeys(spec_of(alice, "tiny"))
        yield srv, alice, keys, new_session(alice, "tiny", keys)


def test_burst_fills_the_queue_and_gets_503_without_losing_accepted(busy):
    srv, _, keys, sid = busy
    n = 10
    xs = [np.random.default_rng(i).normal(size=(1, 6, 6)) for i in range(n)]
    bodies = [ct_body(keys, x) for x in xs]
    barrier = threading.Barrier(n)
    answers: list[httpx.Response | None] = [None] * n

    def fire(i: int) -> None:
        with http(srv.url) as c:
            barrier.wait(10)
            answers[i] = post_predict(c, "tiny", sid, bodies[i])

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    for r, x in zip(answers, xs, strict=True):
        if r.status_code == 200:
            assert np.abs(decrypt(keys, r) - tiny_model().forward(x)).max() < 1e-2
        else:
            problem(r, 503, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
    assert "heinfer_queue_rejections_total" in http(srv.url).get("/metrics").text


def test_sdk_retries_through_a_full_queue(busy, tmp_path):
    srv, *_ = busy
    client = Client(srv.url, ALICE, keystore=tmp_path, allow_insecure=True, backoff=0.05,
                    max_backoff=1.0, retries=20)
    s = client.model("tiny").session()
    xs = [np.random.default_rng(100 + i).normal(size=(1, 6, 6)) for i in range(8)]
    preds = s.predict_batch(xs, concurrency=8, normalized=True)
    for p, x in zip(preds, xs, strict=True):
        assert np.abs(p.logits - tiny_model().forward(x)).max() < 1e-2


def test_a_dead_worker_is_replaced(busy, tmp_path):
    srv, alice, keys, sid = busy
    workers = [p for p in _group_alive(srv.proc.pid) if p != srv.proc.pid]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    x = np.zeros((1, 6, 6))
    # the idle worker's death is not this request's: it runs on a fresh worker
    r = post_predict(alice, "tiny", sid, ct_body(keys, x))
    assert np.abs(decrypt(keys, r) - tiny_model().forward(x)).max() < 1e-2
