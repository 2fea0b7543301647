"""Service benchmark: the real HTTP server on loopback against the in-process evaluation.

    .venv/bin/python -m bench.service_bench [--requests 24] [--quick]

For 1 and 2 HE workers and 1, 2 and 4 concurrent clients: requests per second and latency
percentiles of predict calls. The load generator reuses pre-encrypted bodies (threads posting
bytes), so it does not compete with the workers for the cores. The baseline, measured in the same
run, is the in-process server time for the same plan (deserialize + evaluate + serialize).
Writes bench/results/service_bench.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.results_io import save_results
from heinfer.backends import make_backend
from heinfer.check import checked
from heinfer.codec import encode_encrypt_bytes
from heinfer.plan import CompiledPlan
from heinfer_client import Client
from heinfer_client.local import LocalServer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower


def in_process_ms(plan, xs: np.ndarray) -> list[float]:
    server = make_backend(plan.params)
    compiled = CompiledPlan(plan, server)
    client = make_backend(plan.params)
    server.load_eval_keys(client.generate_keys(compiled.spec.rotation_steps))
    bodies = [encode_encrypt_bytes(client, compiled.spec, x) for x in xs]
    times = []
    for body in bodies:
        t = time.perf_counter()
        out = compiled.run([server.ciphertext_from_bytes(b) for b in body])
        [server.ciphertext_to_bytes(c) for c in out]
        times.append((time.perf_counter() - t) * 1e3)
    return times


def load(url: str, api_key: str, path: str, params: dict, bodies: list[bytes],
         concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300,
                          headers={"Authorization": f"Bearer {api_key}",
                                   "Content-Type": "application/octet-stream"}) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = http.post(path, params=params, content=bodies[i % len(bodies)])
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(ms)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": total, "codes": codes,
            "rps": len(lat) / wall, "p50_ms": statistics.median(lat),
            "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "mean_ms": float(np.mean(lat))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist-cryptonets")
    ap.add_argument("--requests", type=int, default=60, help="requests per configuration")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = 4
    model = zoo.load(args.model)
    images, _ = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[:8])
    plan = checked(lower(model), xs, model.forward)
    base = in_process_ms(plan, xs)
    results = {"in_process_ms_median": statistics.median(base), "configs": []}
    print(f"in-process server time (deserialize + evaluate + serialize): median "
          f"{statistics.median(base):.1f} ms")
    with tempfile.TemporaryDirectory(prefix="heinfer-bench-") as tmp:
        plan_json = plan.save(Path(tmp) / args.model)
        for workers in (1, 2):
            admin, key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            env = {"HEINFER_ADMIN_KEY": admin, "HEINFER_API_KEYS": f"bench:{key}",
                   "HEINFER_WORKERS": str(workers), "HEINFER_MAX_QUEUE": "64",
                   "HEINFER_GENERATE_KEYS": "false", "HEINFER_LOG_LEVEL": "warning"}
            with LocalServer(Path(tmp) / f"data{workers}", env=env) as server:
                with Client(server.url, admin) as a:
                    a.add_model(plan_json)
                c = Client(server.url, key, keystore=Path(tmp) / "keys")
                s = c.model(args.model).session()
                bodies = [s.encode_encrypt(x, normalized=True) for x in xs[:4]]
                # correctness of what the load sends: one decrypted answer vs plaintext
                r = s.predict_encrypted(bodies[0])
                logits = s.decrypt_decode(r.content)
                err = float(np.abs(logits.reshape(-1) - model.forward(xs[0])).max())
                path = f"/v1/models/{args.model}/predict"
                params = {"session_id": s.id, "plan_hash": plan.hash()}
                load(server.url, key, path, params, bodies, 1, 2)  # warm the worker caches
                for conc in (1, 2, 4):
                    row = load(server.url, key, path, params, bodies, conc, args.requests)
                    row.update(workers=workers, max_logit_error=err)
                    results["configs"].append(row)
                    print(f"workers {workers} concurrency {conc}: {row['rps']:.2f} req/s, p50 "
                          f"{row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, codes "
                          f"{row['codes']}")
                c.close()
    by = {(r["workers"], r["concurrency"]): r for r in results["configs"]}
    rt_ratio = by[(1, 1)]["p50_ms"] / results["in_process_ms_median"]
    scale = by[(2, 4)]["rps"] / by[(1, 4)]["rps"]
    results.update(round_trip_over_in_process=rt_ratio, two_worker_speedup=scale,
                   date=time.strftime("%Y-%m-%d"), cores=os.cpu_count())
    print(f"\nround trip (1 worker, 1 client, p50) / in-process server time: {rt_ratio:.2f}x")
    print(f"throughput 2 workers / 1 worker at 4 concurrent clients: {scale:.2f}x")
    save_results("service_bench", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
