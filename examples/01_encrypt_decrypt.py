"""01: encrypt, compute on ciphertexts, decrypt: the CKKS operations every kernel is made of.

    .venv/bin/python examples/01_encrypt_decrypt.py

One backend plays both roles here; in the service the client keeps the secret key and the
server gets only the evaluation keys (examples/05_service_round_trip.py).
"""

import numpy as np

from heinfer.backends import make_backend
from heinfer.params import CKKSParams

# 128-bit parameters: ring degree 8192 (4096 slots), primes [50, 29, 50]: one rescale, and the
# special prime last (the larger it is, the less noise a rotation adds)
params = CKKSParams(poly_modulus_degree=8192, coeff_mod_bits=[50, 29, 50], scale_bits=29)
be = make_backend(params)  # TenSEAL (SEAL 4.3); make_backend(params, "pyfhel") for Pyfhel
be.generate_keys(rotation_steps=[1])  # secret key + relinearization and one Galois key

x = np.linspace(-1, 1, be.slots)
w = np.cos(np.arange(be.slots))
ct = be.encrypt(x)  # fresh: top level, scale 2^29

prod = be.multiply_plain(ct, be.encode(w, be.level(ct), be.prime(be.level(ct))))
be.rescale_inplace(prod)  # back to scale 2^29, one level down
rot = be.rotate(ct, 1)  # slot i <- slot i+1
sq = be.square(ct)        # ciphertext x ciphertext, relinearized
be.rescale_inplace(sq)

for name, got, want in [("x * w", be.decrypt(prod), x * w),
                        ("rotate(x, 1)", be.decrypt(rot), np.roll(x, -1)),
                        ("x^2", be.decrypt(sq), x * x)]:
    err = float(np.abs(got - want).max())
    print(f"{name:<18} max error {err:.1e}")
    assert err < 5e-3, name  # about 2^-10 at scale 2^29: rotations add the most noise
print(f"{params.describe()}; ciphertext {len(be.ciphertext_to_bytes(ct)) / 1e3:.0f} KB")
print("OK")
