"""The Backend protocol is the only seam to SEAL: server/ and client/ never import a binding,
and key generation, loading and validation behave the same through it on both backends."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from heinfer.backends import available_backends, make_backend
from heinfer.backends.base import EvalKeyBytes
from heinfer.errors import MissingKeyError, ParamsMismatchError, SecretKeyError
from heinfer.params import CKKSParams

ROOT = Path(__file__).resolve().parents[1]
SEAL_IMPORT = re.compile(r"^\s*(import|from)\s+(tenseal|Pyfhel|seal)\b", re.M)


def test_no_seal_binding_imported_in_server_or_client():
    offenders = [str(p.relative_to(ROOT)) for d in ("server", "client")
                 for p in sorted((ROOT / d).rglob("*.py")) if SEAL_IMPORT.search(p.read_text())]
    assert offenders == [], f"import a SEAL binding outside heinfer/backends: {offenders}"
    # the pattern itself finds what it is meant to find
    assert SEAL_IMPORT.search("    import tenseal.sealapi as seal\n")


PARAMS = CKKSParams(poly_modulus_degree=4096, coeff_mod_bits=[40, 26, 40], scale_bits=26,
                    insecure=True)
STEPS = [1, 4, -2]


@pytest.mark.parametrize("name", available_backends())
def test_keys_through_the_protocol(name):
    client = make_backend(PARAMS, name)
    keys = client.generate_keys(STEPS)
    # a second key set from the same secret key works as well as the first
    again = client.make_eval_keys(STEPS)
    server = make_backend(PARAMS, name)
    session = server.with_eval_keys(EvalKeyBytes(again.relin_keys, again.galois_keys, STEPS))
    x = np.linspace(-1, 1, PARAMS.slots)
    ct = session.ciphertext_from_bytes(client.encrypt_to_bytes(x))
    out = client.decrypt(session.ciphertext_from_bytes(
        session.ciphertext_to_bytes(session.rotate(session.square(ct), 4))))
    assert np.max(np.abs(out - np.roll(x * x, -4))) < 1e-3
    # a secret key in any section is refused, whatever it is declared as
    sk = client.secret_key_bytes()
    if name == "pyfhel":  # framed with its public and evaluation keys: the SEAL object inside
        head = len(b"heinfer-pyfhel-sk2")
        (n_sk,) = struct.unpack_from("<Q", sk, head)
        sk = sk[head + 40: head + 40 + n_sk]  # five u64 lengths
    for bad in (EvalKeyBytes(sk, keys.galois_keys, STEPS),
                EvalKeyBytes(keys.relin_keys, sk, STEPS)):
        with pytest.raises((SecretKeyError, ParamsMismatchError)) as e:
            server.load_eval_keys(bad)
        if name == "tenseal":
            assert e.type is SecretKeyError
    # keys for other parameters do not load; missing rotation keys are named
    other = make_backend(CKKSParams(poly_modulus_degree=4096, coeff_mod_bits=[30, 20, 30],
                                    scale_bits=20, insecure=True), name)
    foreign = other.generate_keys(STEPS)
    with pytest.raises(ParamsMismatchError):
        server.load_eval_keys(EvalKeyBytes(foreign.relin_keys, foreign.galois_keys, STEPS))
    with pytest.raises(MissingKeyError):
        server.load_eval_keys(EvalKeyBytes(keys.relin_keys, b"", STEPS))
    if name == "tenseal":  # Pyfhel cannot list the elements a Galois key set holds
        with pytest.raises(MissingKeyError, match="3"):
            server.load_eval_keys(EvalKeyBytes(keys.relin_keys, keys.galois_keys, STEPS + [3]))
    server.drop_eval_keys()
    with pytest.raises(MissingKeyError):
        server.square(ct)
