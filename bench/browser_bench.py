"""Browser client benchmark (issue 15): the /app page in Debian headless Chromium against the
Python SDK (Pyfhel backend) on the same `heinfer serve`, same run, same images.

    .venv/bin/python -m bench.browser_bench [--images 50]

The page (web/test/e2e.mjs, playwright-core) makes keys, uploads them and predicts each test
image saved as a 140x140 PNG (the page resizes it to 28x28 in the canvas); the SDK predicts the
same PNG read and resized by Pillow. Reports top-1 agreement, agreement with the true labels, the
page's key generation, encryption and decryption times, and round trips (median) with their
ratio page / SDK. Writes bench/results/browser_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.results_io import save_results
from heinfer.check import checked
from heinfer_client import Client
from heinfer_client.local import LocalServer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower

WEB = Path(__file__).resolve().parents[1] / "web"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    args = ap.parse_args(argv)
    images, labels = fashion_mnist.load("test")
    model = zoo.load("fmnist-cryptonets")
    # served plans carry a check record (heinfer.check): checked on Pyfhel, as it is served
    plan = checked(lower(model).for_backend("pyfhel"),
                   fashion_mnist.normalize(fashion_mnist.load("train")[0][:8]), model.forward)
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pngs = []
        for i in range(args.images):
            p = t / f"img{i}.png"
            Image.fromarray(images[i]).resize((140, 140), Image.Resampling.NEAREST).save(p)
            pngs.append(p)
        plan_json = plan.save(t / "plans" / plan.name)
        env = {"HEINFER_API_KEYS": f"bench:{key}", "HEINFER_ADMIN_KEY": secrets.token_urlsafe(24),
               "HEINFER_GENERATE_KEYS": "false", "HEINFER_WORKERS": "1"}
        with LocalServer(t / "data", env=env, args=["--plan", str(plan_json)]) as server:
            r = subprocess.run(["node", "test/e2e.mjs", server.url, key, plan.name,
                                ",".join(map(str, pngs)), str(t / "shot.png")],
                               cwd=WEB, capture_output=True, text=True, check=True,
                               env={**os.environ})
            page = json.loads(r.stdout.strip().splitlines()[-1])
            c = Client(server.url, key, keystore=t / "keys")
            s = c.model(plan.name).session()
            sdk, sdk_ms = [], []
            for p in pngs:
                x = np.asarray(Image.open(p).resize((28, 28), Image.Resampling.BILINEAR))
                t0 = time.perf_counter()
                sdk.append(s.predict(x).label)
                sdk_ms.append((time.perf_counter() - t0) * 1000)
    runs = page["runs"]
    got = [r["index"] for r in runs]
    med = lambda k: statistics.median(float(r["timings"][k]) for r in runs)  # noqa: E731
    out = {
        "images": args.images,
        "model": "fmnist-cryptonets (pyfhel/seal-4.1)",
        "agreement_with_sdk": float(np.mean(np.array(got) == np.array(sdk))),
        "page_accuracy": float(np.mean(np.array(got) == labels[: args.images])),
        "sdk_accuracy": float(np.mean(np.array(sdk) == labels[: args.images])),
        "page_keygen_ms": float(runs[0]["timings"]["keygenMs"]),
        "page_encrypt_ms_median": med("encryptMs"),
        "page_decrypt_ms_median": med("decryptMs"),
        "page_round_trip_ms_median": med("roundTripMs"),
        "sdk_round_trip_ms_median": statistics.median(sdk_ms),
        "bytes_sent_per_image": int(runs[0]["timings"]["bytesSent"]),
        "load_average": os.getloadavg()[0],
    }
    out["round_trip_ratio_page_over_sdk"] = (out["page_round_trip_ms_median"]
                                             / out["sdk_round_trip_ms_median"])
    print(json.dumps(out, indent=1))
    save_results("browser_bench", out)


if __name__ == "__main__":
    main()
