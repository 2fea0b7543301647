"""Soak: concurrent clients against a real `heinfer serve` on loopback for N minutes.

    .venv/bin/python -m bench.soak [--minutes 5] [--clients 8] [--model fmnist-cryptonets]

Each client has its own API key and session (keys made with the SDK's LocalKeys) and loops:
predict one of its pre-encrypted real Fashion-MNIST test images (so the load generator does not
compete with the HE workers for the cores), every 10th answer decrypted and checked against the
plaintext model; every 10th iteration GET /v1/models and GET its session; every 40th a new
session (same keys uploaded again) replaces the old one, which is deleted.

Every answer is counted by status and code. An *error* is anything other than a 2xx or the
documented back-pressure: 429 or 503 carrying `Retry-After` (the client then waits that long,
as the SDK does). Also an error: a decrypted label that differs from the plaintext model's.
The server's memory (RSS of the API process, and of the HE workers summed) is sampled every 5 s;
growth is reported from the first sample after the warm-up (the first 20% of the run) to the
last. Bounded: stops after --minutes, sends only to 127.0.0.1. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from bench.results_io import save_results
from heinfer.plan import ModelSpec
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower

BINARY = {"Content-Type": "application/octet-stream"}


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong_labels = 0
        self.predicts = 0

    def record(self, r: httpx.Response) -> float:
        """Count an answer; return the seconds to wait before the next request."""
        code = ""
        if r.status_code >= 400:
            try:
                code = r.json().get("code", "")
            except ValueError:
                code = "?"
        key = f"{r.status_code} {code}".strip()
        backoff = r.status_code in (429, 503) and "retry-after" in r.headers
        with self.lock:
            self.answers[key] += 1
            if r.status_code >= 400 and not backoff:
                self.errors[key] += 1
        return float(r.headers["retry-after"]) if backoff else 0.0


def client_loop(url: str, api_key: str, model: str, spec: ModelSpec, xs: np.ndarray,
                expected: list[int], deadline: float, tally: Tally, churn: int) -> None:
    keys = LocalKeys(spec)
    key_body = keys.eval_keys_wire()
    bodies = [keys.encode_encrypt(x) for x in xs]
    with httpx.Client(base_url=url, timeout=300,
                      headers={"Authorization": f"Bearer {api_key}"}) as c:

        def new_session() -> str | None:
            while time.monotonic() < deadline:
                r = c.post("/v1/sessions", params={"model": model}, content=key_body,
                           headers=BINARY)
                wait = tally.record(r)
                if r.status_code == 201:
                    return r.json()["session_id"]
                time.sleep(wait or 1.0)
            return None

        sid = new_session()
        i = 0
        while sid is not None and time.monotonic() < deadline:
            i += 1
            j = i % len(bodies)
            r = c.post(f"/v1/models/{model}/predict", params={"session_id": sid},
                       content=bodies[j], headers=BINARY)
            wait = tally.record(r)
            if r.status_code == 200:
                with tally.lock:
                    tally.predicts += 1
                if i % 10 == 0:
                    label = int(np.argmax(keys.decrypt_decode(r.content)))
                    if label != expected[j]:
                        with tally.lock:
                            tally.wrong_labels += 1
            if wait:
                time.sleep(wait)
            if i % 10 == 0:
                tally.record(c.get("/v1/models"))
                tally.record(c.get(f"/v1/sessions/{sid}"))
            if i % churn == 0:
                old, sid = sid, new_session()
                tally.record(c.delete(f"/v1/sessions/{old}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="fmnist-cryptonets")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="pre-encrypted images per client")
    ap.add_argument("--churn", type=int, default=40,
                    help="iterations between a client's session replacements")
    args = ap.parse_args(argv)

    model = zoo.load(args.model)
    images, _ = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: args.clients * args.images])
    expected = [int(np.argmax(model.forward(x))) for x in xs]
    keys = {f"soak{i}": secrets.token_urlsafe(24) for i in range(args.clients)}
    with tempfile.TemporaryDirectory(prefix="heinfer-soak-") as tmp:
        plan_json = lower(model).save(Path(tmp) / args.model)
        env = {"HEINFER_ADMIN_KEY": secrets.token_urlsafe(24),
               "HEINFER_API_KEYS": ",".join(f"{n}:{k}" for n, k in keys.items()),
               "HEINFER_WORKERS": str(args.workers), "HEINFER_GENERATE_KEYS": "false",
               "HEINFER_LOG_LEVEL": "warning"}
        with LocalServer(Path(tmp) / "data", env=env, args=["--plan", str(plan_json)]) as srv:
            r = httpx.get(f"{srv.url}/v1/models/{args.model}",
                          headers={"Authorization": f"Bearer {keys['soak0']}"})
            spec = ModelSpec.model_validate(r.json()["spec"])
            tally = Tally()
            load0 = os.getloadavg()[0]  # other jobs on the machine slow the run, not its errors
            t0 = time.monotonic()
            deadline = t0 + args.minutes * 60
            threads = [threading.Thread(target=client_loop, daemon=True, args=(
                srv.url, key, args.model, spec, xs[i * args.images:(i + 1) * args.images],
                expected[i * args.images:(i + 1) * args.images], deadline, tally, args.churn))
                for i, key in enumerate(keys.values())]
            for t in threads:
                t.start()
            samples: list[tuple[float, int, int]] = []
            while any(t.is_alive() for t in threads):
                pid = srv.proc.pid
                samples.append((time.monotonic() - t0, rss_kb(pid),
                                sum(rss_kb(c) for c in children(pid))))
                time.sleep(5)
            for t in threads:
                t.join(600)
            elapsed = time.monotonic() - t0
            server_log = srv.log(200_000)
    warm = [s for s in samples if s[0] >= 0.2 * args.minutes * 60] or samples
    api0, api1 = warm[0][1], warm[-1][1]
    wk0, wk1 = warm[0][2], warm[-1][2]
    result = {
        "command": f"python -m bench.soak --minutes {args.minutes:g} --clients {args.clients} "
                   f"--churn {args.churn} "
                   f"--model {args.model} --workers {args.workers}",
        "seconds": round(elapsed, 1), "predicts": tally.predicts,
        "predicts_per_s": round(tally.predicts / elapsed, 2),
        "answers": dict(tally.answers), "errors": dict(tally.errors),
        "wrong_labels": tally.wrong_labels,
        "api_rss_mb": [round(api0 / 1024, 1), round(api1 / 1024, 1)],
        "api_rss_growth": round(api1 / api0 - 1, 4) if api0 else None,
        "workers_rss_mb": [round(wk0 / 1024, 1), round(wk1 / 1024, 1)],
        "workers_rss_growth": round(wk1 / wk0 - 1, 4) if wk0 else None,
        "server_tracebacks": server_log.count("Traceback"),
        "load_average_1m": [round(load0, 1), round(os.getloadavg()[0], 1)],
        # (seconds, API MB, workers MB) every 5 s: a plateau is a cache filling, a slope a leak
        "rss_samples": [(round(t), round(a / 1024, 1), round(w / 1024, 1))
                        for t, a, w in samples],
    }
    for k, v in result.items():
        print(f"{k:20s} {v}")
    save_results("soak", result)
    ok = not tally.errors and not tally.wrong_labels and (result["api_rss_growth"] or 0) < 0.10
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
