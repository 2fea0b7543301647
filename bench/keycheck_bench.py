"""Cost of the exact SEAL validation and the structural secret-key test against upload time.

    .venv/bin/python -m bench.keycheck_bench [--model fmnist-cryptonets] [--repeats 5] [--quick]

In process, one BLAS thread as in the server's workers: `seal_format.check_key_section` over
the model's evaluation keys (decompression, every field, the short-polynomial test of every
RNS component of every stored polynomial), the same with the short test switched off (the
difference is the test's own cost), and `check_ciphertexts` over one predict body. Baseline,
measured in the same run: the same bodies over loopback HTTP to a real `heinfer serve` with one
worker (POST /v1/sessions and POST predict, which include the checks).

Both are measured in wall time and in CPU time (in process: `time.process_time`; server: the
user + system time of the server process and its workers from /proc, per request). CPU time
is what a busy machine does not inflate, so the CPU ratios are the figures to compare; wall
times are printed with the load average. Writes bench/results/keycheck_bench.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.results_io import save_results
from heinfer import wire
from heinfer.check import checked
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower
from heinfer_server import seal_format as sf

TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """user + system seconds of `pid` and its children (the pool's workers)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: ppid
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def _measure(fn, repeats: int, pid: int | None = None) -> tuple[float, float]:
    """Median wall ms and median CPU ms (in process, or of the server tree `pid`)."""
    wall, cpu = [], []
    for _ in range(repeats):
        c0 = _tree_cpu_s(pid) if pid else time.process_time()
        t0 = time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        if pid:
            time.sleep(0.05)  # let the worker's accounting settle
        cpu.append(((_tree_cpu_s(pid) if pid else time.process_time()) - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":  # as in the server's workers
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bench.keycheck_bench",
                                  *(sys.argv[1:] if argv is None else argv)])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-cryptonets")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 2
    model = zoo.load(args.model)
    # served plans carry a check record (heinfer.check)
    plan = checked(lower(model), fashion_mnist.normalize(fashion_mnist.load("train")[0][:8],
                                                         model.input_shape), model.forward)
    spec = plan.spec()
    keys = LocalKeys(spec)
    t = time.perf_counter()
    expect = sf.Expect.of_backend(keys.backend, plan.params.scale)
    res: dict = {"model": args.model, "load_average_start": os.getloadavg()[0],
                 "expect_build_ms": (time.perf_counter() - t) * 1e3}
    body = keys.eval_keys_wire()
    frame = wire.parse_header(body)
    sections = [(s.type.name, p) for s, p in zip(frame.sections, wire.payloads(body, frame),
                                                   strict=True)]
    steps = len(spec.rotation_steps)

    def check_keys() -> None:
        for name, data in sections:
            sf.check_key_section(data, expect, name, sf.key_members_limit(expect, name, steps))

    def check_keys_without_short_test() -> None:
        real = expect.short.short_rows
        expect.short.short_rows = lambda rows, q: np.zeros(len(list(rows)), bool)
        try:
            check_keys()
        finally:
            expect.short.short_rows = real

    images, _ = fashion_mnist.load("test")
    x = fashion_mnist.normalize(images[:1])[0]
    ct_body = keys.encode_encrypt(x)
    cts = wire.decode_ciphertexts(ct_body)
    check_keys()  # warm
    res.update(key_bytes=len(body), rotation_steps=steps, predict_bytes=len(ct_body))
    for name, fn in (("check_keys", check_keys),
                     ("check_keys_without_short_test", check_keys_without_short_test),
                     ("check_predict", lambda: sf.check_ciphertexts(cts, expect))):
        res[f"{name}_ms"], res[f"{name}_cpu_ms"] = _measure(fn, args.repeats)

    with tempfile.TemporaryDirectory(prefix="heinfer-bench-") as tmp:
        plan_json = plan.save(Path(tmp) / args.model)
        key = secrets.token_urlsafe(24)
        env = {"HEINFER_ADMIN_KEY": secrets.token_urlsafe(24), "HEINFER_API_KEYS": f"b:{key}",
               "HEINFER_WORKERS": "1", "HEINFER_GENERATE_KEYS": "false",
               "HEINFER_LOG_LEVEL": "warning", "HEINFER_MAX_SESSIONS_PER_KEY": "64"}
        with LocalServer(Path(tmp) / "data", env=env, args=["--plan", str(plan_json)]) as srv:
            c = httpx.Client(base_url=srv.url, timeout=300,
                             headers={"Authorization": f"Bearer {key}",
                                      "Content-Type": "application/octet-stream"})
            sids: list[str] = []

            def upload() -> None:
                r = c.post("/v1/sessions", params={"model": args.model}, content=body)
                r.raise_for_status()
                sids.append(r.json()["session_id"])

            upload()
            sid = sids[0]
            res["upload_ms"], res["upload_cpu_ms"] = _measure(upload, args.repeats,
                                                              srv.proc.pid)
            for s in sids[1:]:
                c.delete(f"/v1/sessions/{s}")

            def predict() -> None:
                c.post(f"/v1/models/{args.model}/predict", params={"session_id": sid},
                       content=ct_body).raise_for_status()

            predict()
            res["predict_ms"], res["predict_cpu_ms"] = _measure(predict, args.repeats,
                                                                srv.proc.pid)
    res["short_test_keys_cpu_ms"] = (res["check_keys_cpu_ms"]
                                     - res["check_keys_without_short_test_cpu_ms"])
    res["check_share_of_upload_cpu"] = res["check_keys_cpu_ms"] / res["upload_cpu_ms"]
    res["short_share_of_upload_cpu"] = res["short_test_keys_cpu_ms"] / res["upload_cpu_ms"]
    res["check_share_of_predict_cpu"] = res["check_predict_cpu_ms"] / res["predict_cpu_ms"]
    res["check_share_of_upload_wall"] = res["check_keys_ms"] / res["upload_ms"]
    res["check_share_of_predict_wall"] = res["check_predict_ms"] / res["predict_ms"]
    res["load_average_end"] = os.getloadavg()[0]
    for k, v in res.items():
        print(f"{k:36s} {v:.3f}" if isinstance(v, float) else f"{k:36s} {v}")
    save_results("keycheck_bench", res, quick=args.quick)


if __name__ == "__main__":
    main()
