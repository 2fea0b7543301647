"""Start-up never destroys data (issue 12, item 2), through a real `heinfer serve`:
a lost, empty or truncated database next to plans and keys refuses to start and touches
nothing; --adopt-orphans brings every model and session back; files without a row are moved to
quarantine/, never deleted; kill -9 during key uploads loses no acknowledged session; a plan or
key file lost server-side is a 500 with a code, never a client error showing a server path."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer, free_port
from tests.test_server_support import (
    ALICE,
    BOB,
    ct_body,
    decrypt,
    http,
    new_session,
    post_keys,
    post_predict,
    problem,
    server_env,
    spec_of,
    tiny_model,
    tiny_plan,
)

X = np.random.default_rng(7).normal(size=(1, 6, 6))


def _files(data: Path) -> dict[str, str]:
    """Every plan and key file with its SHA-256 (what must never be lost)."""
    out = {}
    for sub in ("models", "sessions"):
        for p in sorted((data / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(data))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _serve_exit(data: Path, *args: str) -> subprocess.CompletedProcess:
    """`heinfer serve` that is expected to refuse to start (bounded)."""
    srv = LocalServer(data, env=server_env())
    env = {**os.environ, "HEINFER_HOST": "127.0.0.1", "HEINFER_PORT": str(free_port()),
           "HEINFER_DATA_DIR": str(data), **srv.extra_env}
    return subprocess.run(srv.command + list(args), env=env, capture_output=True, text=True,
                          timeout=60)


def _predict_ok(url: str, key: str, sid: str, keys: LocalKeys) -> None:
    r = post_predict(http(url, key), "tiny", sid, ct_body(keys, X))
    assert np.abs(decrypt(keys, r) - tiny_model().forward(X)).max() < 1e-2


def test_lost_database_refuses_to_start_then_adopt_brings_everything_back(tmp_path):
    plan = tiny_plan(tmp_path / "plans")
    data = tmp_path / "data"
    with LocalServer(data, env=server_env(), args=["--plan", str(plan)]) as srv:
        keys = LocalKeys(spec_of(http(srv.url), "tiny"))
        sessions = {ALICE: new_session(http(srv.url, ALICE), "tiny", keys),
                    BOB: new_session(http(srv.url, BOB), "tiny", keys)}
    before = _files(data)
    assert any(k.startswith("models/tiny/") for k in before) and len(before) >= 6
    db = data / "heinfer.db"
    good = db.read_bytes()

    # deleted, emptied, truncated: each refuses, exit 2, and every file stays as it was
    for damage in ("missing", "empty", "unreadable"):
        if damage == "missing":
            db.unlink()
        else:
            db.write_bytes(b"" if damage == "empty" else good[: len(good) // 2])
        done = _serve_exit(data, "--plan", str(plan))
        assert done.returncode == 2, (damage, done.stdout, done.stderr[-2000:])
        assert f"is {damage}" in done.stderr and "--adopt-orphans" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert _files(data) == before
        assert not (data / "quarantine").exists()

    # the truncated database stays; adopt sets it aside and rebuilds models and sessions
    with LocalServer(data, env=server_env(), args=["--adopt-orphans"]) as srv:
        for key, sid in sessions.items():  # same ids, same keys: nothing re-uploaded
            _predict_ok(srv.url, key, sid, keys)
            assert http(srv.url, key).get(f"/v1/sessions/{sid}").status_code == 200
        problem(http(srv.url, BOB).get(f"/v1/sessions/{sessions[ALICE]}"), 404,
                "unknown_session")  # owners were restored too
        assert [m["name"] for m in http(srv.url).get("/v1/models").json()] == ["tiny"]
        assert re.search(r'heinfer_quarantined_total\{kind="database"\} [1-3]\.0',
                         http(srv.url).get("/metrics").text)
    after = _files(data)
    assert {k: v for k, v in after.items() if k in before} == before
    aside = list((data / "quarantine").glob("*/heinfer.db"))
    assert len(aside) == 1 and aside[0].read_bytes() == good[: len(good) // 2]

    # discard: a lost database again, now told to start empty; the files go to quarantine/
    db.unlink()
    with LocalServer(data, env=server_env(), args=["--discard-orphans"]) as srv:
        assert http(srv.url).get("/v1/models").json() == []
    kept = {str(p.relative_to(data)).split("/", 2)[2]: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (data / "quarantine").rglob("*") if p.is_file()
            and p.relative_to(data).parts[2] in ("models", "sessions")}
    assert {k: v for k, v in kept.items() if k in before} == before


def test_orphans_are_quarantined_and_lost_files_are_server_errors(tmp_path):
    plan = tiny_plan(tmp_path / "plans")
    data = tmp_path / "data"
    with LocalServer(data, env=server_env(), args=["--plan", str(plan)]) as srv:
        keys = LocalKeys(spec_of(http(srv.url), "tiny"))
        sid = new_session(http(srv.url), "tiny", keys)
    # a key directory and a plan without rows (as a crash between file and row leaves them)
    orphan = data / "sessions" / "s_orphan-keys-0001"
    orphan.mkdir()
    (orphan / "relin.seal").write_bytes((data / "sessions" / sid / "relin.seal").read_bytes())
    stray_plan = data / "models" / "tiny" / ("0" * 64 + ".plan.json")
    stray_plan.write_text("{}")
    with LocalServer(data, env=server_env(), args=["--plan", str(plan)]) as srv:
        metrics = http(srv.url).get("/metrics").text
        assert 'heinfer_quarantined_total{kind="session"} 1.0' in metrics
        assert 'heinfer_quarantined_total{kind="plan"} 1.0' in metrics
        q = next((data / "quarantine").iterdir())
        assert (q / "sessions" / orphan.name / "relin.seal").read_bytes() == (
            data / "sessions" / sid / "relin.seal").read_bytes()
        assert (q / "models" / "tiny" / stray_plan.name).read_text() == "{}"
        assert not orphan.exists() and not stray_plan.exists()
        assert '"quarantined"' in srv.log(100_000) and orphan.name in srv.log(100_000)
        _predict_ok(srv.url, ALICE, sid, keys)  # the live session was left alone

        # keys lost server-side: a server error with its code, not "unknown session"
        relin = data / "sessions" / sid / "relin.seal"
        saved = relin.read_bytes()
        relin.unlink()
        body = problem(post_predict(http(srv.url), "tiny", sid, ct_body(keys, X)), 500,
                       "session_keys_missing")
        assert str(data) not in body["detail"]
        relin.write_bytes(saved)

        # the plan lost server-side: 500 plan_files_missing, no server path shown
        plan_json = next((data / "models" / "tiny").glob("*.plan.json"))
        plan_json.rename(plan_json.with_suffix(".moved"))
        for r in (post_predict(http(srv.url), "tiny", sid, ct_body(keys, X)),
                  post_keys(http(srv.url), "tiny", keys.eval_keys_wire())):
            body = problem(r, 500, "plan_files_missing")
            assert str(data) not in body["detail"] and ".plan." not in body["detail"]
        plan_json.with_suffix(".moved").rename(plan_json)
        _predict_ok(srv.url, ALICE, sid, keys)


def test_kill_9_during_key_uploads_loses_no_acknowledged_session(tmp_path):
    plan = tiny_plan(tmp_path / "plans")
    data = tmp_path / "data"
    srv = LocalServer(data, env=server_env(), args=["--plan", str(plan)]).start()
    try:
        keys = LocalKeys(spec_of(http(srv.url), "tiny"))
        body = keys.eval_keys_wire()
        acknowledged: list[str] = []
        stop = threading.Event()
        streaming = threading.Barrier(3)

        def fast() -> None:  # complete uploads back to back until the server dies
            with http(srv.url) as c:
                while not stop.is_set():
                    try:
                        r = post_keys(c, "tiny", body)
                    except httpx.TransportError:
                        return
                    if r.status_code == 201:
                        acknowledged.append(r.json()["session_id"])

        def slow() -> None:  # an upload still arriving when the server is killed
            def chunks():
                yield body[: len(body) // 2]
                streaming.wait(10)
                time.sleep(5)
                yield body[len(body) // 2:]
            try:
                post_keys(http(srv.url), "tiny", chunks())
            except httpx.TransportError:
                pass

        threads = [threading.Thread(target=f) for f in (fast, fast, slow, slow)]
        for t in threads:
            t.start()
        streaming.wait(20)
        deadline = time.monotonic() + 20
        while len(acknowledged) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()
        stop.set()
        for t in threads:
            t.join(20)
        assert len(acknowledged) >= 3
        srv.stop()
        srv = LocalServer(data, env=server_env(), args=["--plan", str(plan)]).start()
        for sid in acknowledged:
            assert http(srv.url).get(f"/v1/sessions/{sid}").status_code == 200
        _predict_ok(srv.url, ALICE, acknowledged[0], keys)
        _predict_ok(srv.url, ALICE, acknowledged[-1], keys)
        assert os.listdir(data / "tmp") == []
        # whatever a killed upload left in place without a row was set aside, not deleted
        for d in (data / "quarantine").glob("*/sessions/*"):
            assert (d / "relin.seal").stat().st_size > 0
    finally:
        srv.stop()
