"""The main job as a service: a real server on loopback, the SDK against it, real images.

[owner]  compiles the shipped model to a plan (as a model owner would, once);
[server] `heinfer serve` starts as a child process with the embedded default (SQLite + files in
         a temporary data directory), and the plan is added with the admin key;
[client] five SDK lines: Client -> model spec -> session (keys made locally, evaluation keys
         uploaded) -> predict on Fashion-MNIST test images over HTTP -> decrypted labels;
then prints predictions, accuracy, latency (round trip and HE time inside the server) and bytes
on the wire, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist-cryptonets")
    ap.add_argument("--images", type=int, default=20, help="number of test images")
    ap.add_argument("--first-conv", default="im2col", choices=["im2col", "rotation"])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests in flight (1: clean per-request latency)")
    args = ap.parse_args(argv)

    # The demo plays the model owner too, so it needs the compiler and the zoo (imported here,
    # not by the client package).
    from heinfer.check import checked
    from heinfer.errors import ModelFormatError
    from heinfer.progress import Progress
    from heinfer_client import Client
    from heinfer_client.local import LocalServer
    from heinfer_models import fashion_mnist, zoo
    from heinfer_packing.lower import lower

    try:
        model = zoo.load(args.model)
    except ModelFormatError as e:
        print(f"demo_service: {e} (train it with `make train`)", file=sys.stderr)
        return 2
    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: args.images])
    ys = labels[: args.images]

    with tempfile.TemporaryDirectory(prefix="heinfer-demo-") as tmp:
        t = time.perf_counter()
        train, _ = fashion_mnist.load("train")
        # checked like every plan `heinfer compile` writes: the server serves no other
        plan = checked(lower(model, first_conv=args.first_conv),
                       fashion_mnist.normalize(train[:8], model.input_shape), model.forward)
        plan_json = plan.save(Path(tmp) / args.model)
        print(f"[owner]  compiled {args.model} to plan {plan.hash()} in "
              f"{time.perf_counter() - t:.1f} s: {plan.params.describe()}")

        admin_key, api_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        env = {"HEINFER_ADMIN_KEY": admin_key, "HEINFER_API_KEYS": f"demo:{api_key}",
               "HEINFER_WORKERS": str(args.workers), "HEINFER_GENERATE_KEYS": "false",
               "HEINFER_LOG_LEVEL": "warning"}
        t = time.perf_counter()
        with LocalServer(Path(tmp) / "data", env=env) as server:
            print(f"[server] `heinfer serve` ready on {server.url} in "
                  f"{time.perf_counter() - t:.1f} s ({args.workers} HE worker(s), data in "
                  f"{server.data_dir})")
            with Client(server.url, admin_key) as admin:
                admin.add_model(plan_json)
            print(f"[server] model {args.model} added with the admin key")

            # -- the client's five lines ----------------------------------------------------
            t = time.perf_counter()
            c = Client(server.url, api_key, keystore=Path(tmp) / "keystore")
            m = c.model(args.model)
            s = m.session()
            setup = time.perf_counter() - t
            print(f"[client] spec fetched, keys made for {len(m.spec.rotation_steps)} rotation "
                  f"steps, {s.key_upload_bytes / 1e6:.1f} MB of evaluation keys uploaded: "
                  f"{setup:.1f} s; secret key stays in {c.keystore.root}")
            t = time.perf_counter()
            with Progress(len(xs), "[client] encrypted inference over HTTP", unit="img") as bar:
                preds = s.predict_batch(list(xs), concurrency=args.concurrency,
                                        normalized=True,  # fashion_mnist.normalize did it
                                        progress=lambda done, total: bar.update(1))
            wall = time.perf_counter() - t
            c.close()

        plain = [model.forward(x) for x in xs]
        names = m.labels or [str(i) for i in range(10)]
        for i, p in enumerate(preds[:10]):
            mark = "ok " if p.label == ys[i] else "MISS"
            print(f"  image {i:3d}: predicted {names[p.label]:<12} "
                  f"(p={p.probabilities[p.label]:.2f}) true {names[ys[i]]:<12} {mark}")
        rt = np.array([p.seconds for p in preds]) * 1e3
        he = np.array([p.server_ms for p in preds if p.server_ms is not None])
        up = np.mean([p.bytes_sent for p in preds])
        down = np.mean([p.bytes_received for p in preds])
        acc = float(np.mean([p.label == y for p, y in zip(preds, ys, strict=True)]))
        agree = float(np.mean([p.label == int(np.argmax(q)) for p, q in
                               zip(preds, plain, strict=True)]))
        err = max(float(np.abs(p.logits - q.reshape(-1)).max()) for p, q in
                  zip(preds, plain, strict=True))
        print(f"\n[client] {len(preds)} images over HTTP: accuracy {acc:.1%}, agreement with the "
              f"plaintext model {agree:.1%}, max logit error {err:.2e}")
        print(f"  round trip / image     {rt.mean():8.1f} ms (median {np.median(rt):.1f} ms; "
              "encrypt + HTTP + HE + decrypt)")
        if he.size:
            print(f"  HE time in server      {he.mean():8.1f} ms (median {np.median(he):.1f} ms)")
        print(f"  throughput             {len(preds) / wall:8.2f} images/s "
              f"(concurrency {args.concurrency})")
        print(f"  upload / image         {up / 1e3:8.1f} KB ({m.limits['input_ciphertexts']} "
              "ciphertexts, seeded, framed)")
        print(f"  download / image       {down / 1e3:8.1f} KB")
        print(f"  evaluation keys        {s.key_upload_bytes / 1e6:8.1f} MB (once per session)")
        print("[server] stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
