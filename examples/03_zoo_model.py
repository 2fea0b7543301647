"""03: compile a zoo model, check the plan, run it encrypted on Fashion-MNIST test images.

    .venv/bin/python examples/03_zoo_model.py [--model fmnist-cryptonets] [--images 4]

The same steps as `heinfer compile fmnist-cryptonets --out plans/cn` then `heinfer verify`, as
library calls: lower the model to a plan, check it (a real CKKS run against the plaintext model,
the record stored in the plan), then the two roles: the client encrypts, the server evaluates
with evaluation keys only, the client decrypts.
"""

import argparse

import numpy as np

from heinfer.backends import backend_for_spec, make_backend
from heinfer.backends.base import EvalKeyBytes
from heinfer.check import checked
from heinfer.codec import decrypt_decode, encode_encrypt_bytes
from heinfer.plan import CompiledPlan
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="fmnist-cryptonets", choices=zoo.names())
ap.add_argument("--images", type=int, default=4)
args = ap.parse_args()

model = zoo.load(args.model)
train, _ = fashion_mnist.load("train")
plan = checked(lower(model), fashion_mnist.normalize(train[:8], model.input_shape),
               model.forward)
print(f"{args.model}: {plan.params.describe()}\n{plan.metadata['check']['method']} check: "
      f"agreement {plan.metadata['check']['agreement']:.0%}, max error "
      f"{plan.metadata['check']['max_error']:.1e}")

server_be = make_backend(plan.params)
compiled = CompiledPlan(plan, server_be)  # what a server worker keeps per model
client_be = backend_for_spec(compiled.spec)  # the client sees only the public spec
keys = client_be.generate_keys(compiled.spec.rotation_steps)
server = server_be.with_eval_keys(EvalKeyBytes(keys.relin_keys, keys.galois_keys,
                                               compiled.spec.rotation_steps))

images, labels = fashion_mnist.load("test")
xs = fashion_mnist.normalize(images[: args.images], model.input_shape)
for x, y in zip(xs, labels, strict=False):
    body = encode_encrypt_bytes(client_be, compiled.spec, x)  # bytes on the wire
    out = compiled.run([server.ciphertext_from_bytes(b) for b in body], backend=server)
    reply = [server.ciphertext_to_bytes(c) for c in out]
    logits = decrypt_decode(client_be, compiled.spec,
                            [client_be.ciphertext_from_bytes(b) for b in reply])
    plain = model.forward(x)
    print(f"label {model.labels[y]:<12} encrypted -> {model.labels[int(np.argmax(logits))]:<12}"
          f" plaintext -> {model.labels[int(np.argmax(plain))]:<12} max logit error "
          f"{np.abs(logits - plain).max():.1e}")
    assert int(np.argmax(logits)) == int(np.argmax(plain))
print("OK")
