"""Isolation of failure (issue 12, item 5), through a real `heinfer serve` and real signals:
a worker killed mid-request fails that request only (500 `worker_crashed`, which the SDK does not
retry) while the other tenant's request in flight succeeds; idle workers killed are replaced and
the next request succeeds; crashes are counted in /metrics; one API key cannot take the whole
queue nor make another wait behind its backlog; one key cycling 12 sessions does not evict
another key's cached keys; a key whose requests keep killing workers is refused."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from heinfer_client import Client
from heinfer_client.errors import WorkerCrashedError
from heinfer_client.keys import LocalKeys
from heinfer_client.sdk import WireLog
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import Layer, Model
from tests.conftest import small_params
from tests.test_server_support import (
    ALICE,
    BOB,
    CAROL,
    ct_body,
    decrypt,
    http,
    new_session,
    post_predict,
    problem,
    running_server,
    spec_of,
    tiny_model,
    tiny_plan,
)


def slow_model() -> Model:
    """About 0.5 s of HE work per request at n=8192: long enough to kill a worker mid-job."""
    rng = np.random.default_rng(3)
    return Model("slow", (1, 16, 16), [
        Layer("conv1", "conv2d", {"stride": 1, "padding": 0}, rng.normal(0, 0.3, (8, 1, 3, 3)),
              rng.normal(0, 0.1, 8)),
        Layer("act1", "poly", {"coeffs": [0.0, 0.5, 0.25]}),
        Layer("flatten", "flatten"),
        Layer("fc", "dense", {}, rng.normal(0, 0.05, (128, 8 * 14 * 14)),
              rng.normal(0, 0.1, 128)),
        Layer("act2", "poly", {"coeffs": [0.0, 0.5, 0.25]}),
        Layer("fc2", "dense", {}, rng.normal(0, 0.1, (3, 128)), rng.normal(0, 0.1, 3)),
    ])


def slow_plan(directory: Path) -> Path:
    from heinfer.check import checked

    model = slow_model()
    plan = lower(model, small_params(5, n=8192), first_conv="rotation")
    # modelled: a real check would run this deliberately slow model 8 times
    xs = np.random.default_rng(0).uniform(-1, 1, (8, *model.input_shape))
    return checked(plan, xs, model.forward, method="modelled").save(Path(directory) / "slow")


def workers_of(server_pid: int) -> list[int]:
    """The pool's worker processes (spawned children; not the resource tracker)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"spawn_main" in cmd:
            out.append(int(pid))
    return sorted(out)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy_workers(server_pid: int, n: int, timeout: float = 20) -> list[int]:
    """Wait until `n` workers burn CPU (evaluating, not just received a job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = workers_of(server_pid)
        before = {p: cpu_ticks(p) for p in pids}
        time.sleep(0.08)
        busy = [p for p in pids if cpu_ticks(p) - before[p] >= 1]
        if len(busy) >= n:
            return busy
    raise AssertionError(f"fewer than {n} busy workers after {timeout} s")


def metric(url: str, name: str) -> float:
    """One sample from /metrics, read with a key of its own (not the tenants' rate limits)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {CAROL}"}).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_workers(url: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, "heinfer_workers") < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "heinfer_workers") == n


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    d = tmp_path_factory.mktemp("isolation")
    # a key is refused after 2 requests that killed their worker (default 3; fewer kills here)
    with running_server(d, [slow_plan(d / "plans")], workers=2, max_crashes_per_key=2) as srv:
        keys = LocalKeys(spec_of(http(srv.url), "slow"))
        sids = {k: new_session(http(srv.url, k), "slow", keys) for k in (ALICE, BOB)}
        yield srv, keys, sids


X = np.random.default_rng(11).normal(size=(1, 16, 16))
CRASHED = 'heinfer_worker_crashes_total{during="request"}'
IDLE = 'heinfer_worker_crashes_total{during="idle"}'


def test_a_worker_killed_mid_request_fails_that_request_only(two_workers):
    srv, keys, sids = two_workers
    expected = slow_model().forward(X)
    body = ct_body(keys, X)
    answers: dict[str, httpx.Response] = {}

    def send(key: str) -> None:
        answers[key] = post_predict(http(srv.url, key), "slow", sids[key], body)

    threads = [threading.Thread(target=send, args=(k,)) for k in sids]
    for t in threads:
        t.start()
    victim = busy_workers(srv.proc.pid, 2)[0]  # both tenants' requests are being evaluated
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in answers.values())
    assert codes == [200, 500], {k[:5]: r.text[:300] for k, r in answers.items()}
    for r in answers.values():
        if r.status_code == 200:  # the other tenant never noticed
            assert np.abs(decrypt(keys, r) - expected).max() < 1e-2
        else:
            assert "retry-after" not in r.headers
            assert "not retried" in problem(r, 500, "worker_crashed")["detail"].lower()
    assert metric(srv.url, CRASHED) == 1
    wait_workers(srv.url, 2)  # replaced; both tenants carry on
    for key in sids:
        r = post_predict(http(srv.url, key), "slow", sids[key], body)
        assert np.abs(decrypt(keys, r) - expected).max() < 1e-2


def test_idle_workers_killed_then_the_next_request_succeeds(two_workers):
    srv, keys, sids = two_workers
    idle_before = metric(srv.url, IDLE)
    for pid in workers_of(srv.proc.pid):
        os.kill(pid, signal.SIGKILL)
    r = post_predict(http(srv.url), "slow", sids[ALICE], ct_body(keys, X))  # sent at once
    assert np.abs(decrypt(keys, r) - slow_model().forward(X)).max() < 1e-2
    assert metric(srv.url, IDLE) == idle_before + 2
    wait_workers(srv.url, 2)


def test_the_sdk_does_not_retry_a_request_that_crashed_a_worker(two_workers, tmp_path):
    srv, *_ = two_workers
    wire = WireLog()
    client = Client(srv.url, ALICE, keystore=tmp_path, allow_insecure=True, retries=6,
                    backoff=0.05, transport=wire.transport())
    session = client.model("slow").session()
    outcome: list[object] = []

    def predict() -> None:
        try:
            outcome.append(session.predict(X, normalized=True))
        except Exception as e:  # noqa: BLE001  (the assertion below says which)
            outcome.append(e)

    t = threading.Thread(target=predict)
    t.start()
    os.kill(busy_workers(srv.proc.pid, 1)[0], signal.SIGKILL)
    t.join(60)
    assert outcome and isinstance(outcome[0], WorkerCrashedError), outcome
    assert outcome[0].status == 500 and outcome[0].code == "worker_crashed"
    posts = [u for m, u, *_ in wire.requests if m == "POST" and "/predict" in u]
    assert len(posts) == 1, posts
    wait_workers(srv.url, 2)


def test_a_key_whose_requests_keep_killing_workers_is_refused(two_workers):
    srv, keys, sids = two_workers
    sid = new_session(http(srv.url, CAROL), "slow", keys)
    body = ct_body(keys, X)
    out: list[httpx.Response] = []
    for i in range(2):
        t = threading.Thread(target=lambda: out.append(
            post_predict(http(srv.url, CAROL), "slow", sid, body)))
        t.start()
        os.kill(busy_workers(srv.proc.pid, 1)[0], signal.SIGKILL)
        t.join(60)
        problem(out[i], 500, "worker_crashed")
        wait_workers(srv.url, 2)
    r = post_predict(http(srv.url, CAROL), "slow", sid, body)
    problem(r, 429, "too_many_crashes")
    assert int(r.headers["retry-after"]) > 500  # until the first crash is 600 s old
    r = post_predict(http(srv.url, BOB), "slow", sids[BOB], body)  # others are served
    assert np.abs(decrypt(keys, r) - slow_model().forward(X)).max() < 1e-2


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    d = tmp_path_factory.mktemp("fairness")
    plans = [slow_plan(d / "plans"), tiny_plan(d / "plans")]
    tiny_keys = LocalKeys(spec_of_plan(plans[1]))
    cost = 2 * len(tiny_keys.eval_keys_wire())  # what a loaded tiny key set counts for
    with running_server(d, plans, workers=1, max_queue=6, worker_key_cache_bytes=5 * cost,
                        worker_key_cache_tenant_bytes=int(2.5 * cost)) as srv:
        yield srv, tiny_keys


def spec_of_plan(path: Path):
    from heinfer.plan import Plan

    return Plan.load(path).spec()


def test_one_key_cannot_fill_the_queue_nor_delay_another_behind_it(one_worker):
    srv, _ = one_worker
    keys = LocalKeys(spec_of(http(srv.url), "slow"))
    sid = {k: new_session(http(srv.url, k), "slow", keys) for k in (ALICE, BOB)}
    body = ct_body(keys, X)
    done: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    go = threading.Barrier(6)

    def send(key: str, who: str, wait: bool) -> None:
        with http(srv.url, key) as c:
            if wait:
                go.wait(10)
            r = post_predict(c, "slow", sid[key], body)
        with lock:
            done.append((who, r.status_code, time.monotonic()))
            if r.status_code == 503:
                assert "per-key" in problem(r, 503, "overloaded")["detail"]
                assert int(r.headers["retry-after"]) >= 1

    alice = [threading.Thread(target=send, args=(ALICE, "alice", True)) for _ in range(6)]
    for t in alice:
        t.start()
    deadline = time.monotonic() + 20  # every alice request answered or admitted
    while metric(srv.url, "heinfer_queue_depth") + len(done) < 6 and (
            time.monotonic() < deadline):
        time.sleep(0.02)
    waiting = metric(srv.url, "heinfer_queue_depth")  # alice's share is 1 running + 3 waiting
    t_bob = time.monotonic()
    bob = threading.Thread(target=send, args=(BOB, "bob", False))
    bob.start()
    for t in [*alice, bob]:
        t.join(60)
    statuses = [(who, status) for who, status, _ in done]
    assert statuses.count(("alice", 503)) >= 1, statuses  # refused: alice's share was full
    assert ("bob", 200) in statuses and ("alice", 500) not in statuses, statuses
    assert waiting >= 3, (waiting, statuses)
    later = [who for who, status, t in sorted(done, key=lambda d: d[2])
             if status == 200 and t > t_bob]
    # round-robin: bob's job runs right after the one in progress, not after alice's backlog
    assert later.index("bob") <= 1, later


def test_twelve_sessions_of_one_key_do_not_evict_another_keys_cached_keys(one_worker):
    srv, keys = one_worker
    alice, bob = http(srv.url, ALICE), http(srv.url, BOB)
    x = np.random.default_rng(4).normal(size=(1, 6, 6))
    body = ct_body(keys, x)
    bob_sid = new_session(bob, "tiny", keys)  # validated (and cached) in the only worker
    hits = 'heinfer_key_cache_lookups_total{result="hit"}'
    h0 = metric(srv.url, hits)
    assert np.abs(decrypt(keys, post_predict(bob, "tiny", bob_sid, body))
                  - tiny_model().forward(x)).max() < 1e-2
    assert metric(srv.url, hits) == h0 + 1
    for _ in range(12):  # alice cycles sessions, each with a predict
        sid = new_session(alice, "tiny", keys)
        decrypt(keys, post_predict(alice, "tiny", sid, body))
        alice.delete(f"/v1/sessions/{sid}")
    h1 = metric(srv.url, hits)
    assert h1 >= h0 + 13  # alice's own fresh sessions were cached too
    decrypt(keys, post_predict(bob, "tiny", bob_sid, body))
    assert metric(srv.url, hits) == h1 + 1  # bob's keys were still loaded


def test_key_cache_policy_evicts_the_heaviest_tenant_first():
    from heinfer_server.keycache import KeyCache

    c = KeyCache(max_bytes=100, tenant_bytes=50)
    c.put("b1", "bob", 20, "B1")
    for i in range(12):  # alice cycles sessions: only her own entries go
        c.put(f"a{i}", "alice", 20, i)
        assert c.tenant_usage("alice") <= 50 and c.get("b1") == "B1"
    assert len(c) == 3 and c.get("a11") == 11 and c.get("a9") is None
    c.put("c1", "carol", 30, "C1")
    c.put("d1", "dave", 15, "D1")  # 105 in all: alice (the heaviest, 40) loses her oldest
    assert c.total == 85 and c.get("a10") is None and c.get("a11") == 11
    assert c.get("b1") == "B1" and c.get("c1") == "C1" and c.get("d1") == "D1"
    assert not c.put("big", "dave", 51, "D") and "big" not in c  # larger than a share
