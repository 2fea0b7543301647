"""Upload limits and abuse throttles through real HTTP against `heinfer serve` on 127.0.0.1
(issue 12, items 4 and 6): each case reproduces what a hostile client did, on a raw socket
where httpx would not send it (a lying Content-Length, a stalled body)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from heinfer import wire
from heinfer_client import Client, errors
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer, heinfer_command
from tests.test_server_support import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
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
    tiny_plan,
)

MAX_KEY_BYTES = 8 << 20
QUOTA = 5 << 20  # one tiny session's keys (3.4 MB) fit, two do not


# -- raw HTTP/1.1 ------------------------------------------------------------------------------
def request_head(method: str, target: str, key: str | None = ALICE,
                 **headers: str | int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(url: str, data: bytes = b"") -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def answer(s: socket.socket) -> tuple[int, dict[str, str], dict, float]:
    """Read until the server closes: (status, headers, JSON body, seconds waited)."""
    t0, data = time.monotonic(), b""
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body or b"{}"), time.monotonic() - t0


def ctype(**h: str | int) -> dict[str, str | int]:
    return {"Content_Type": "application/octet-stream", **h}


# -- one server with short body timeouts, 2 uploads per key and a small storage quota -----------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    with running_server(d, [tiny_plan(d / "plans")], max_key_bytes=MAX_KEY_BYTES,
                        max_bytes_per_key=QUOTA, max_uploads_per_key=2, body_idle_timeout_s=1,
                        body_timeout_s=3, header_timeout_s=1.5) as srv:
        alice = http(srv.url, ALICE)
        keys = LocalKeys(spec_of(alice, "tiny"))
        yield {"srv": srv, "alice": alice, "keys": keys, "sid": new_session(alice, "tiny", keys),
               "tmp": srv.data_dir / "tmp"}
        alice.close()


def test_declared_length_over_the_limit_answers_at_once(env):
    """Content-Length 10^15 with a 4-byte body: 413 at once and the connection closed (it hung
    before: the server waited for the body)."""
    url, sid = env["srv"].url, env["sid"]
    for target, key in (("/v1/sessions?model=tiny", ALICE), ("/v1/sessions?model=tiny", None),
                        (f"/v1/models/tiny/predict?session_id={sid}", ALICE)):
        s = connect(url, request_head("POST", target, key, **ctype(Content_Length=10**15))
                    + b"HEIW")
        status, headers, body, waited = answer(s)
        assert status == (413 if key else 401) and waited < 2, (status, body, waited)
        assert headers["connection"] == "close"
        if key:
            assert body["code"] == "payload_too_large" and f"{10**15:,}" in body["detail"]
    assert os.listdir(env["tmp"]) == []


def test_frame_header_checked_from_the_first_bytes(env):
    """A 100 MB upload is refused after its 16-byte header, before any of it is stored (300 MB
    of garbage filled the temp directory before the 400)."""
    url, tmp = env["srv"].url, env["tmp"]
    bad_head = {
        b"\x00" * 16: (400, "malformed_body"),  # not wire framing, not a TenSEAL context
        wire.HEADER.pack(wire.MAGIC, 1, int(wire.Kind.CIPHERTEXTS), 1, 0): (400, "wrong_kind"),
        wire.HEADER.pack(wire.MAGIC, 2, int(wire.Kind.EVAL_KEYS), 1, 0): (400, "malformed_body"),
        # a section larger than the key limit: refused from the table, before its payload
        wire.HEADER.pack(wire.MAGIC, 1, int(wire.Kind.EVAL_KEYS), 1, 0)
        + wire.ENTRY.pack(int(wire.Section.RELIN_KEYS), 0, 0, 100 << 20): (413, "item_too_large"),
    }
    for first, (want, code) in bad_head.items():
        s = connect(url, request_head("POST", "/v1/sessions?model=tiny",
                                      **ctype(Content_Length=1 << 20)) + first)
        status, _, body, waited = answer(s)
        assert (status, body["code"]) == (want, code) and waited < 2, body
        assert os.listdir(tmp) == []
    # predict: the item count is checked from the header too
    s = connect(url, request_head("POST", f"/v1/models/tiny/predict?session_id={env['sid']}",
                                  **ctype(Content_Length=50_000))
                + wire.HEADER.pack(wire.MAGIC, 1, int(wire.Kind.CIPHERTEXTS), 3, 0))
    status, _, body, waited = answer(s)
    assert (status, body["code"]) == (400, "wrong_count") and waited < 2


def test_chunked_uploads_get_the_quota_check_while_streaming(env):
    """No Content-Length: the size the frame announces is held against the storage quota at
    once, and the running total against the quota for bodies that announce none."""
    alice = env["alice"]
    announced = (wire.HEADER.pack(wire.MAGIC, 1, int(wire.Kind.EVAL_KEYS), 1, 0)
                 + wire.ENTRY.pack(int(wire.Section.RELIN_KEYS), 0, 0, 6 << 20))

    def body(first: bytes, n: int):
        yield first
        for _ in range(n):
            yield b"\x00" * (1 << 20)

    problem(post_keys(alice, "tiny", body(announced, 6)), 429, "quota_exceeded")
    # a TenSEAL-context-looking body is read whole (to name a secret key) but within the quota
    problem(post_keys(alice, "tiny", body(b"\x0a\x4a\x5e\xa1", 7)), 429, "quota_exceeded")
    # more bytes than the header announces: refused while streaming
    short = (wire.HEADER.pack(wire.MAGIC, 1, int(wire.Kind.EVAL_KEYS), 1, 0)
             + wire.ENTRY.pack(int(wire.Section.RELIN_KEYS), 0, 0, 1 << 20))
    problem(post_keys(alice, "tiny", body(short, 2)), 400, "malformed_body")
    assert os.listdir(env["tmp"]) == []


def stalled_upload(env, key: str = CAROL) -> bytes:
    """Headers and the first 4 KiB of a real key upload: valid so far."""
    body = env["keys"].eval_keys_wire()
    return request_head("POST", "/v1/sessions?model=tiny", key,
                        **ctype(Content_Length=len(body))) + body[:4096]


def test_stalled_and_trickling_bodies_time_out_with_408(env):
    url = env["srv"].url
    # stalled: headers and 4 KiB, then nothing (idle timeout 1 s)
    s = connect(url, stalled_upload(env))
    status, headers, body, waited = answer(s)
    assert (status, body["code"]) == (408, "body_timeout") and 0.8 < waited < 3
    assert headers["connection"] == "close"
    # trickling: a byte every 0.5 s never trips the idle timeout; the 3 s total does
    s = connect(url, stalled_upload(env))
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 8:
            s.sendall(b"\x00")
            time.sleep(0.5)
    except OSError:  # closed by the server after its 408
        pass
    status, _, body, _ = answer(s)
    assert (status, body["code"]) == (408, "body_timeout")
    assert 2.5 < time.monotonic() - t0 < 6
    assert os.listdir(env["tmp"]) == []


def closed_after(s: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the server closes `s`, sending `trickle` a byte every 0.3 s meanwhile."""
    t0 = time.monotonic()
    s.settimeout(0.3)
    for i in range(40):
        try:
            if s.recv(1 << 16) == b"":
                break
        except TimeoutError:
            pass
        except OSError:
            break
        try:
            if i < len(trickle):
                s.sendall(trickle[i : i + 1])
        except OSError:
            break
    s.close()
    return time.monotonic() - t0


def test_silent_and_trickling_headers_are_cut_off(env):
    """uvicorn held a connection that sent nothing, or its headers a byte at a time, for ever:
    the header deadline (1.5 s here) closes it; a normal keep-alive connection is unaffected."""
    url = env["srv"].url
    assert 1.2 < closed_after(connect(url)) < 4
    head = request_head("GET", "/v1/models")
    assert 1.2 < closed_after(connect(url), trickle=head) < 4
    s = connect(url, head)  # two requests on one connection, 1 s apart: both answered
    assert one_response(s).startswith(b"HTTP/1.1 200 ")
    time.sleep(1.0)
    s.sendall(head)
    assert one_response(s).startswith(b"HTTP/1.1 200 ")
    s.close()


def test_oversized_headers_answer_431(env):
    """httptools kept every header byte: 300 MB of headers grew the server by 300 MB. Over
    64 KiB (the default) the answer is 431 and the connection is closed."""
    s = connect(env["srv"].url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    try:
        for _ in range(128):  # 1 MB, far more than the server reads
            s.sendall(line)
    except OSError:  # closed after its 431
        pass
    status, headers, body, waited = answer(s)
    assert (status, body["code"]) == (431, "headers_too_large") and waited < 2
    assert headers["content-type"] == "application/problem+json"
    # a large body right behind small headers, in one write, is not mistaken for headers
    keys = env["keys"]
    r = post_predict(env["alice"], "tiny", env["sid"], ct_body(keys, np.zeros((1, 6, 6))))
    assert r.status_code == 200


def one_response(s: socket.socket) -> bytes:
    """One whole response from a kept-alive connection (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(1 << 16)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(1 << 16)
    return head


def test_concurrent_uploads_per_key_are_limited(env):
    """Two stalled uploads hold this key's two slots: a third is refused with 429 and
    Retry-After, another key is not affected, and the slots come back after the timeouts."""
    url, keys = env["srv"].url, env["keys"]
    carol = http(url, CAROL)
    stalled = [connect(url, stalled_upload(env)) for _ in range(2)]
    time.sleep(0.3)
    r = post_keys(carol, "tiny", keys.eval_keys_wire())
    problem(r, 429, "too_many_uploads")
    assert int(r.headers["retry-after"]) >= 1
    x = np.random.default_rng(3).normal(size=(1, 6, 6))  # another key is not affected
    assert decrypt(keys, post_predict(env["alice"], "tiny", env["sid"], ct_body(keys, x))
                   ).shape == (3,)
    for s in stalled:
        assert answer(s)[0] == 408
    assert post_keys(carol, "tiny", keys.eval_keys_wire()).status_code == 201


# -- throttles: requests per key, wrong keys per address; docs behind a key --------------------
@pytest.fixture(scope="module")
def throttled(tmp_path_factory):
    d = tmp_path_factory.mktemp("throttled")
    with running_server(d, [tiny_plan(d / "plans")], rate_limit="10 per 2 seconds",
                        bad_key_limit="4/minute", docs_require_key="true") as srv:
        yield srv


def test_request_rate_per_key(throttled):
    alice, bob = http(throttled.url, ALICE), http(throttled.url, BOB)
    codes = [alice.get("/v1/models").status_code for _ in range(14)]
    assert codes[:10] == [200] * 10 and set(codes[10:]) == {429}, codes
    r = alice.get("/v1/models")
    body = problem(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 2 and "slow down" in body["detail"]
    assert bob.get("/v1/models").status_code == 200  # per key
    time.sleep(int(r.headers["retry-after"]) + 0.2)
    assert alice.get("/v1/models").status_code == 200
    assert 'heinfer_limit_rejections_total{code="rate_limited"}' in bob.get("/metrics").text


def test_sdk_waits_out_pacing_429s_and_raises_beyond_its_patience(throttled):
    """The SDK honours Retry-After on `rate_limited` (refused before any work, so safe to
    resend), and raises at once when the server asks for a longer wait than it will take."""
    time.sleep(2.2)  # a fresh window after the previous test's burst
    with Client(throttled.url, ALICE) as c:
        t0 = time.monotonic()
        for _ in range(14):  # 4 past the limit of 10 per 2 s: one wait, no error
            assert any(m["name"] == "tiny" for m in c.models())
        assert time.monotonic() - t0 >= 0.9
    time.sleep(2.2)
    with Client(throttled.url, ALICE, max_retry_after=0.5) as c:
        for _ in range(10):
            c.models()
        t0 = time.monotonic()
        with pytest.raises(errors.QuotaExceededError) as e:
            c.models()
        assert e.value.code == "rate_limited" and e.value.retry_after >= 1
        assert time.monotonic() - t0 < 0.5


def test_docs_and_openapi_can_require_a_key(throttled):
    anon, carol = http(throttled.url, None), http(throttled.url, CAROL)
    for path in ("/docs", "/openapi.json"):
        problem(anon.get(path), 401, "missing_api_key")
    assert "swagger" in carol.get("/docs").text.lower()
    assert "/v1/sessions" in carol.get("/openapi.json").json()["paths"]
    problem(anon.get("/metrics"), 401, "missing_api_key")


def test_wrong_keys_are_throttled_per_address(throttled):
    """Runs last on this server: it locks 127.0.0.1 out for a minute."""
    guesses = [http(throttled.url, f"guess-{i}-Hc3jR6yU0eQ5wA8dF1gV") for i in range(6)]
    for i, c in enumerate(guesses[:4]):  # a forged X-Forwarded-For is not believed by default
        problem(c.get("/v1/models", headers={"X-Forwarded-For": f"198.51.100.{i}"}), 401,
                "invalid_api_key")
    r = guesses[4].get("/v1/models")
    problem(r, 429, "too_many_bad_keys")
    assert 30 <= int(r.headers["retry-after"]) <= 60
    # the key is not even looked at now: a valid one from this address waits too (documented)
    problem(http(throttled.url, ADMIN).get("/v1/models"), 429, "too_many_bad_keys")
    assert http(throttled.url, None).get("/v1/health/live").status_code == 200


# -- disk floor --------------------------------------------------------------------------------
def test_disk_floor_refuses_new_uploads_and_keeps_sessions(tmp_path):
    plan = tiny_plan(tmp_path / "plans")
    with running_server(tmp_path, [plan]) as srv:
        alice = http(srv.url, ALICE)
        keys = LocalKeys(spec_of(alice, "tiny"))
        sid = new_session(alice, "tiny", keys)
    # the same data, now "short of space": a floor above any disk's free space
    with running_server(tmp_path, [plan], min_free_disk_bytes=1 << 60) as srv:
        alice, admin = http(srv.url, ALICE), http(srv.url, ADMIN)
        r = post_keys(alice, "tiny", keys.eval_keys_wire())
        problem(r, 507, "insufficient_storage")
        assert int(r.headers["retry-after"]) >= 1
        files = {"plan_json": plan.read_bytes(),
                 "plan_npz": plan.with_name("tiny.plan.npz").read_bytes()}
        problem(admin.post("/v1/models", params={"name": "other"}, files=files), 507,
                "insufficient_storage")
        x = np.random.default_rng(4).normal(size=(1, 6, 6))
        assert decrypt(keys, post_predict(alice, "tiny", sid, ct_body(keys, x))).shape == (3,)
        assert alice.get(f"/v1/sessions/{sid}").status_code == 200


# -- item 6: conformance and process hygiene -------------------------------------------------
def test_405_carries_allow_and_422_matches_the_schema(env):
    alice = env["alice"]
    r = alice.put("/v1/models")
    problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"
    r = alice.patch("/v1/sessions/s_abcdefgh")
    assert r.headers["allow"] == "GET, DELETE"
    schema = alice.get("/openapi.json").json()
    declared = schema["paths"]["/v1/models/{name}/predict"]["post"]["responses"]["422"]
    r = alice.post("/v1/models/tiny/predict", content=b"x",
                   headers={"Content-Type": "application/octet-stream"})
    problem(r, 422, "validation_error")
    assert list(declared["content"]) == [r.headers["content-type"]]
    assert "HTTPValidationError" not in json.dumps(schema)


def test_missing_plan_file_exits_non_zero(tmp_path):
    out = subprocess.run([*heinfer_command(), "serve", "--plan", str(tmp_path / "missing.json")],
                         env={**os.environ, **server_env(), "HEINFER_DATA_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "missing.json not found" in out.stderr, out


def test_a_preloaded_plan_that_fails_to_install_stops_the_server(tmp_path):
    """Not only a missing file: any preloaded plan the workers refuse (here its weights are
    garbage) stops `heinfer serve` with exit 2 and the reason, instead of a server that stays
    up answering 503 not_ready forever."""
    plan = tiny_plan(tmp_path / "plans")
    Path(str(plan).removesuffix(".json") + ".npz").write_bytes(b"PK\x03\x04 not a zip")
    out = subprocess.run([*heinfer_command(), "serve", "--plan", str(plan), "--port", "0"],
                         env={**os.environ, **server_env(),
                              "HEINFER_DATA_DIR": str(tmp_path / "data")},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert f"preloading plan {plan} failed: invalid_plan" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_stopping_the_server_leaks_no_semaphores(tmp_path):
    """SIGTERM to the server, and Ctrl-C to a server's whole group: workers reaped, no
    traceback, no `resource_tracker: ... leaked semaphore objects` once every process of the
    group is gone. (Both servers start at once: start-up is most of this test's time.)"""
    plan = tiny_plan(tmp_path / "plans")
    ways = ((signal.SIGTERM, False), (signal.SIGINT, True))
    servers = [LocalServer(tmp_path / f"data{n}", env=server_env(workers=1),
                           args=["--plan", str(plan)]) for n in range(len(ways))]
    starting = [threading.Thread(target=srv.start) for srv in servers]
    for t in starting:
        t.start()
    for t in starting:
        t.join(120)
    try:
        for srv, (sig, group) in zip(servers, ways, strict=True):
            assert srv.proc.poll() is None, srv.log()
            (os.killpg if group else os.kill)(srv.proc.pid, sig)
        for srv, (sig, _) in zip(servers, ways, strict=True):
            assert srv.proc.wait(20) in (0, -sig)  # uvicorn re-raises the signal it handled
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the resource tracker reports as it exits
                try:
                    os.killpg(srv.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            log = srv.log(100_000)
            assert "leaked" not in log and "Traceback" not in log, log[-2000:]
    finally:
        for srv in servers:
            srv.stop()


def test_sdk_sees_no_change_for_normal_use(env):
    """The limits stay out of a normal client's way: keys, predicts, a bigger body in parts."""
    bob = http(env["srv"].url, BOB)
    keys = LocalKeys(spec_of(bob, "tiny"))
    body = keys.eval_keys_wire()

    def parts():
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    r = post_keys(bob, "tiny", parts())
    assert r.status_code == 201, r.text
    x = np.random.default_rng(5).normal(size=(1, 6, 6))
    out = decrypt(keys, post_predict(bob, "tiny", r.json()["session_id"], ct_body(keys, x)))
    assert out.shape == (3,)
