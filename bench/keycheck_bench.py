"""Cost of the exact SEAL validation and the structural secret-key test against upload time.

    .venv/bin/python -m bench.keycheck_bench [--model fmnist-cryptonets] [--repeats 5] [--quick]

In process (one core): `seal_format.check_key_section` over the model's evaluation keys, split
into decompression + field parsing and the short-polynomial test (coefficient form and sampled
inverse NTT of every RNS component of every stored polynomial), and `check_ciphertext` over a
predict body. Baseline, measured in the same run: the same uploads over loopback HTTP to a real
`heinfer serve` with one worker (POST /v1/sessions and POST predict, which include the checks).
The short test's own cost is the difference with the same parse with the test switched off.
Writes bench/results/keycheck_bench.json.
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
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower
from heinfer_server import seal_format as sf


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


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
    plan = lower(zoo.load(args.model))
    spec = plan.spec()
    keys = LocalKeys(spec)
    be = keys.backend
    t = time.perf_counter()
    expect = sf.Expect.of_backend(be, plan.params.scale)
    expect_ms = (time.perf_counter() - t) * 1e3
    body = keys.eval_keys_wire()
    frame = wire.parse_header(body)
    sections = [(s.type.name, p) for s, p in zip(frame.sections, wire.payloads(body, frame),
                                                   strict=True)]
    steps = len(spec.rotation_steps)

    def full() -> None:
        for name, data in sections:
            sf.check_key_section(data, expect, name, sf.key_members_limit(expect, name, steps))

    def decompress_only() -> None:
        for name, data in sections:
            sf.decompress(data, expect, sf.key_members_limit(expect, name, steps), name)

    def without_short_test() -> None:  # the same parse with the short test switched off
        real = expect.short.short_rows
        expect.short.short_rows = lambda rows, q: np.zeros(len(rows), bool)
        try:
            full()
        finally:
            expect.short.short_rows = real

    images, _ = fashion_mnist.load("test")
    x = fashion_mnist.normalize(images[:1])[0]
    ct_body = keys.encode_encrypt(x)
    cts = wire.decode_ciphertexts(ct_body)

    def ct_check() -> None:
        for i, c in enumerate(cts):
            sf.check_ciphertext(c, expect, i)

    full()  # warm
    res = {"model": args.model, "key_bytes": len(body), "key_sections": len(sections),
           "rotation_steps": steps, "expect_build_ms": expect_ms,
           "check_keys_ms": _median_ms(full, args.repeats),
           "decompress_keys_ms": _median_ms(decompress_only, args.repeats),
           "check_keys_without_short_test_ms": _median_ms(without_short_test, args.repeats),
           "predict_bytes": len(ct_body), "check_predict_ms": _median_ms(ct_check, args.repeats)}

    with tempfile.TemporaryDirectory(prefix="heinfer-bench-") as tmp:
        plan_json = plan.save(Path(tmp) / args.model)
        key = secrets.token_urlsafe(24)
        env = {"HEINFER_ADMIN_KEY": secrets.token_urlsafe(24), "HEINFER_API_KEYS": f"b:{key}",
               "HEINFER_WORKERS": "1", "HEINFER_GENERATE_KEYS": "false",
               "HEINFER_LOG_LEVEL": "warning"}
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
            res["upload_ms"] = _median_ms(upload, args.repeats)
            for s in sids[1:]:
                c.delete(f"/v1/sessions/{s}")

            def predict() -> None:
                c.post(f"/v1/models/{args.model}/predict", params={"session_id": sid},
                       content=ct_body).raise_for_status()

            predict()
            res["predict_ms"] = _median_ms(predict, args.repeats)
    res["short_test_keys_ms"] = res["check_keys_ms"] - res["check_keys_without_short_test_ms"]
    res["check_share_of_upload"] = res["check_keys_ms"] / res["upload_ms"]
    res["short_share_of_upload"] = res["short_test_keys_ms"] / res["upload_ms"]
    res["check_share_of_predict"] = res["check_predict_ms"] / res["predict_ms"]
    for k_, v in res.items():
        print(f"{k_:28s} {v:.3f}" if isinstance(v, float) else f"{k_:28s} {v}")
    save_results("keycheck_bench", res, quick=args.quick)


if __name__ == "__main__":
    main()
