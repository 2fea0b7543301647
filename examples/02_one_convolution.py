"""02: one convolution on an encrypted image, checked against numpy.

    .venv/bin/python examples/02_one_convolution.py

The compiler lowers a one-layer model to a plan (input layout, kernel, parameters); the kernel
runs on ciphertexts with rotations and plaintext multiplies, and the decrypted output is the
convolution numpy computes.
"""

import numpy as np

from heinfer.backends import make_backend
from heinfer.codec import decrypt_decode, encode_encrypt
from heinfer.plan import CompiledPlan
from heinfer.reference import conv2d
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import Layer, Model

rng = np.random.default_rng(0)
weight, bias = rng.normal(0, 0.3, (4, 1, 3, 3)), rng.normal(0, 0.1, 4)
model = Model("one-conv", (1, 12, 12),
              [Layer("conv", "conv2d", {"stride": 1, "padding": 1}, weight, bias)])
# "rotation": the image goes in one ciphertext and the server rotates (small upload);
# "im2col" (the default) has the client arrange the windows (larger upload, fewer rotations)
plan = lower(model, first_conv="rotation")
print(f"plan: {plan.params.describe()}, input layout {plan.input_layout}")

be = make_backend(plan.params)
compiled = CompiledPlan(plan, be)  # kernels built, weights encoded once
be.generate_keys(compiled.spec.rotation_steps)  # Galois keys for exactly the plan's steps
x = rng.normal(size=(1, 12, 12))
out = decrypt_decode(be, compiled.spec, compiled.run(encode_encrypt(be, compiled.spec, x)))
want = conv2d(x, weight, bias, stride=1, padding=1)
err = float(np.abs(out.reshape(want.shape) - want).max())
print(f"conv 1->4 3x3 on 12x12: {len(compiled.spec.rotation_steps)} rotation keys, max error "
      f"{err:.1e} against numpy")
assert err < 1e-3
print("OK")
