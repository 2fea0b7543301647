"""The main job: encrypted inference of a shipped model on real Fashion-MNIST test images.

Plays both roles in one process, sharing only bytes, as a client and a server would: the server
lowers the model to a plan and publishes its public spec; the client makes keys for exactly the
plan's rotations, encrypts each image in the plan's input layout and sends seeded ciphertexts;
the server evaluates with the client's evaluation keys only; the client decrypts and decodes.
"""

from __future__ import annotations

import argparse

import numpy as np

from heinfer_models import fashion_mnist, zoo
from heinfer_models.evaluate import add_plan_options, evaluate_encrypted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=zoo.DEFAULT_MODEL, choices=zoo.names())
    ap.add_argument("--images", type=int, default=20, help="number of test images")
    add_plan_options(ap)
    args = ap.parse_args(argv)

    model = zoo.load(args.model)
    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: args.images], model.input_shape)
    ys = labels[: args.images]
    res = evaluate_encrypted(model, xs, first_conv=args.first_conv, precise=args.precise)
    s = res.summary(ys)
    print(f"[server] model {model.name}: {s['params']}")
    print(f"[server] input layout {s['input_layout']}")
    names = model.labels or [str(i) for i in range(10)]
    for i, p in enumerate(res.predictions[:10]):
        mark = "ok" if p == ys[i] else "MISS"
        print(f"  image {i:3d}: predicted {names[p]:<12} true {names[ys[i]]:<12} {mark}")
    print(f"\n[client] {s['images']} images: encrypted accuracy {s['encrypted_accuracy']:.1%}, "
          f"agreement with the plaintext model {s['agreement']:.1%}, "
          f"max logit error {s['max_logit_error']:.2e}")
    print(f"  server time / image   {s['server_ms_mean']:8.1f} ms "
          f"(median {s['server_ms_median']:.1f} ms, one process)")
    print(f"  client encrypt / dec  {s['encrypt_ms']:8.1f} ms / {s['decrypt_ms']:.1f} ms")
    print(f"  upload / image        {s['upload_bytes'] / 1e3:8.1f} KB "
          f"({s['input_ciphertexts']} seeded ciphertexts)")
    print(f"  download / image      {s['download_bytes'] / 1e3:8.1f} KB")
    print(f"  evaluation keys       {s['eval_key_bytes'] / 1e6:8.1f} MB (seeded, once per "
          f"session; keygen {s['keygen_s']:.1f} s)")
    print(f"  plaintext accuracy (full test set, recorded) "
          f"{model.metadata.get('plaintext_accuracy', float('nan')):.2%}")
    return 0 if np.isfinite(s["max_logit_error"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
