"""Throughput mode (batch in slots) for the CryptoNets-style model, 1 and 2 worker processes.

    .venv/bin/python -m bench.throughput_bench [--batch 4096] [--quick]

Each worker process holds the compiled plan and the client's relinearization key and evaluates
one full batch (one image per slot); the 2-worker run evaluates two batches at once. Reports
images/s amortized, peak resident memory per worker, and agreement and max logit error against
the plaintext model over every image. Writes bench/results/throughput_bench.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

import numpy as np

from bench.results_io import save_results
from heinfer.backends import make_backend
from heinfer.backends.base import EvalKeyBytes
from heinfer.codec import decrypt_decode_batch, encode_encrypt_batch
from heinfer.plan import CompiledPlan
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB. Linux: VmHWM, the high-water mark of this
    address space only; ru_maxrss is not enough in a spawned worker, as Linux carries the
    parent's peak over the exec (a worker of a 3 GB parent would report 3 GB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(model_name: str, relin: bytes, body: list[bytes], queue) -> None:
    plan = lower(zoo.load(model_name), batch=True)
    be = make_backend(plan.params)
    be.load_eval_keys(EvalKeyBytes(relin, b"", []))
    compiled = CompiledPlan(plan, be)
    t = time.perf_counter()
    out = compiled.run([be.ciphertext_from_bytes(b) for b in body])
    reply = [be.ciphertext_to_bytes(c) for c in out]
    seconds = time.perf_counter() - t
    peak_mb = peak_rss_mb()
    queue.put((seconds, peak_mb, reply))


def run_workers(model_name: str, relin: bytes, bodies: list[list[bytes]]) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(model_name, relin, b, queue)) for b in bodies]
    t = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {"wall_s": time.perf_counter() - t, "eval_s": [r[0] for r in results],
            "peak_mb": [r[1] for r in results], "replies": [r[2] for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist-cryptonets")
    ap.add_argument("--batch", type=int, default=0, help="images per batch (default: slots)")
    ap.add_argument("--quick", action="store_true", help="64-image batches")
    args = ap.parse_args(argv)
    model = zoo.load(args.model)
    plan = lower(model, batch=True)
    batch = 64 if args.quick else (args.batch or plan.params.slots)
    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: 2 * batch])
    client = make_backend(plan.params)
    spec = plan.spec(client)
    keys = client.generate_keys([])
    t = time.perf_counter()
    bodies = [encode_encrypt_batch(client, spec, xs[i * batch:(i + 1) * batch]) for i in (0, 1)]
    enc_s = (time.perf_counter() - t) / 2
    print(f"{plan.params.describe()}; batch {batch}; client encrypts a batch in {enc_s:.1f} s "
          f"({sum(map(len, bodies[0])) / 1e6:.0f} MB); keys {keys.nbytes() / 1e6:.1f} MB "
          "(relinearization only)")
    one = run_workers(args.model, keys.relin_keys, bodies[:1])
    two = run_workers(args.model, keys.relin_keys, bodies)
    logits = [decrypt_decode_batch(client, spec, [client.ciphertext_from_bytes(b) for b in r],
                                   batch) for r in two["replies"]]
    he = np.concatenate(logits)
    plain = np.stack([model.forward(x) for x in xs])
    agreement = float(np.mean(he.argmax(1) == plain.argmax(1)))
    result = {
        "model": args.model, "batch": batch, "params": plan.params.describe(),
        "one_worker_images_per_s": batch / one["wall_s"],
        "two_workers_images_per_s": 2 * batch / two["wall_s"],
        "eval_s_one": one["eval_s"], "eval_s_two": two["eval_s"],
        "peak_mb_per_worker": max(two["peak_mb"]), "client_encrypt_s_per_batch": enc_s,
        "upload_bytes_per_image": sum(map(len, bodies[0])) / batch,
        "agreement": agreement, "max_logit_error": float(np.abs(he - plain).max()),
        "encrypted_accuracy": float(np.mean(he.argmax(1) == labels[: 2 * batch])),
        "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
    }
    result["scaling"] = result["two_workers_images_per_s"] / result["one_worker_images_per_s"]
    print(json.dumps(result, indent=1))
    save_results("throughput_bench", result, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
