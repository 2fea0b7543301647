"""First benchmark: TenSEAL's tutorial network run as the tutorial does it, the same network and
weights through heinfer, and the CryptoNets-style model, all in one run on the same images.

    .venv/bin/python -m bench.first_bench [--images 50] [--tutorial-images 10] [--quick]

Prints a table with ratios against the tutorial measured in this run, and writes
bench/results/first_bench.json. Not a test: figures are reported, never asserted (only sanity).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from bench.results_io import save_results
from bench.tenseal_tutorial import run_tutorial
from heinfer.backends import available_backends
from heinfer.profile import format_profile
from heinfer_models import fashion_mnist, zoo
from heinfer_models.evaluate import evaluate_encrypted


def _row(name: str, r: dict) -> str:
    return (f"{name:<38}{r['server_ms_mean']:>10.1f}{r['encrypt_ms']:>9.1f}{r['decrypt_ms']:>8.1f}"
            f"{r['upload_bytes'] / 1e3:>10.0f}{r['eval_key_bytes'] / 1e6:>9.1f}"
            f"{r['max_logit_error']:>10.1e}{r['agreement']:>7.0%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50, help="images for heinfer runs")
    ap.add_argument("--tutorial-images", type=int, default=10, help="images for the tutorial")
    ap.add_argument("--quick", action="store_true", help="few images, for CI")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.tutorial_images = 3, 2

    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: max(args.images, args.tutorial_images)])
    tut_model = zoo.load("fmnist-tenseal-tutorial")
    cn_model = zoo.load("fmnist-cryptonets")
    results: dict[str, dict] = {}

    xt = xs[: args.tutorial_images]
    results["tutorial_default_threads"] = run_tutorial(zoo.model_dir("fmnist-tenseal-tutorial"),
                                                       xt, None)
    results["tutorial_1_thread"] = run_tutorial(zoo.model_dir("fmnist-tenseal-tutorial"), xt, 1)
    for key in ("tutorial_default_threads", "tutorial_1_thread"):
        r = results[key]
        r["server_ms_mean"] = r["server_s"] * 1e3
        r["encrypt_ms"] = r["client_encrypt_s"] * 1e3
        r["decrypt_ms"] = r["client_decrypt_s"] * 1e3
    profiles = {}
    # heinfer_tutorial_net: one input ciphertext (upload below the tutorial's); the im2col
    # variant trades upload for server time. "precise" keeps the last rescale (see lower()).
    configs = [("heinfer_tutorial_net", tut_model, "rotation", args.images, False, "tenseal"),
               ("heinfer_tutorial_net_im2col", tut_model, "im2col", args.images, False,
                "tenseal"),
               ("heinfer_cryptonets", cn_model, "im2col", args.images, False, "tenseal"),
               ("heinfer_cryptonets_precise", cn_model, "im2col", args.images, True, "tenseal"),
               ("heinfer_cryptonets_small_upload", cn_model, "rotation",
                max(2, args.images // 5), False, "tenseal")]
    if "pyfhel" in available_backends():
        configs.append(("heinfer_cryptonets[pyfhel]", cn_model, "im2col",
                        max(2, args.images // 5), False, "pyfhel"))
    for key, model, conv, n, precise, backend in configs:
        res = evaluate_encrypted(model, xs[:n], first_conv=conv, progress=False,
                                 precise=precise, backend=backend)
        results[key] = res.summary(labels[:n])
        results[key]["op_counts"] = {k: [n_, s] for k, (n_, s) in res.op_counts.items()}
        profiles[key] = format_profile(res.layer_profile) + "\n" + res.op_table
        results[key]["layers"] = res.layer_profile

    base = results["tutorial_default_threads"]["server_ms_mean"]
    base1 = results["tutorial_1_thread"]["server_ms_mean"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'configuration':<38}{'server ms':>10}{'enc ms':>9}{'dec ms':>8}{'upload KB':>10}"
          f"{'keys MB':>9}{'max err':>10}{'agree':>7}")
    for key, r in results.items():
        print(_row(key, r))
    ht = results["heinfer_tutorial_net"]["server_ms_mean"]
    print(f"\nspeed-up of heinfer on the tutorial network (one input ciphertext): {base / ht:.1f}x "
          f"vs the tutorial at default threads, {base1 / ht:.1f}x vs 1 thread")
    tut = results["tutorial_default_threads"]
    h = results["heinfer_tutorial_net"]
    print(f"upload {h['upload_bytes'] / tut['upload_bytes']:.2f}x, keys "
          f"{h['eval_key_bytes'] / tut['eval_key_bytes']:.2f}x, max logit error "
          f"{h['max_logit_error'] / tut['max_logit_error']:.2f}x the tutorial's")
    for key, table in profiles.items():
        print(f"\nHE operations for one image, {key}:\n{table}")
    print()
    save_results("first_bench", {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                                      "results": results}, quick=args.quick)
    sane = all(np.isfinite(r["server_ms_mean"]) and r["server_ms_mean"] > 0
               for r in results.values())
    return 0 if sane else 1


if __name__ == "__main__":
    raise SystemExit(main())
