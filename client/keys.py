"""Client key material for one model spec: a backend holding the secret key, and the public
evaluation keys framed for upload (relinearization + Galois keys for exactly the spec's
rotation steps, seeded: about half the bytes of unseeded keys), with the public key: the server
re-randomizes (and, for sanitized plans, floods) every output with it (heinfer.sanitize).

Evaluation keys are derived from the secret key: a reused secret key (from the key store) makes
fresh evaluation keys on demand, so only the small secret key is kept on disk.
"""

from __future__ import annotations

import threading

import numpy as np

from heinfer import wire
from heinfer.backends import backend_for_spec, check_spec_supported
from heinfer.codec import encode_encrypt_bytes
from heinfer.plan import ModelSpec


def check_backend(spec: ModelSpec) -> None:
    """SEAL loads data only from its own major.minor, so a spec naming a backend/version this
    client cannot run is refused before any key is made (ParamsMismatchError)."""
    check_spec_supported(spec)


class LocalKeys:
    """Secret-key side of one session: encrypt inputs, decrypt outputs, make evaluation keys.
    Thread-safe (one lock): the backend's temporary files are not."""

    def __init__(self, spec: ModelSpec, secret_key: bytes | None = None):
        check_backend(spec)
        self.spec = spec
        self.backend = backend_for_spec(spec)  # the backend (and SEAL version) the spec names
        self._lock = threading.Lock()
        self._eval_wire: bytes | None = None
        if secret_key is None:
            keys = self.backend.generate_keys(spec.rotation_steps)
            self._eval_wire = wire.encode_eval_keys(keys.relin_keys, keys.galois_keys,
                                                    self._public_key())
        else:
            self.backend.load_secret_key(secret_key)

    def secret_key_bytes(self) -> bytes:
        """Only for the local key store."""
        return self.backend.secret_key_bytes()

    def eval_keys_wire(self) -> bytes:
        """The upload body for POST /v1/sessions: public material only."""
        with self._lock:
            if self._eval_wire is None:
                keys = self.backend.make_eval_keys(self.spec.rotation_steps)
                self._eval_wire = wire.encode_eval_keys(keys.relin_keys, keys.galois_keys,
                                                        self._public_key())
            return self._eval_wire

    def _public_key(self) -> bytes | None:
        """The public key, for the server to re-randomize outputs (both backends)."""
        make = getattr(self.backend, "public_key_bytes", None)
        return make() if make is not None else None

    def drop_eval_keys(self) -> None:
        """Free the (large) evaluation keys once uploaded."""
        with self._lock:
            self._eval_wire = None
            self.backend.drop_eval_keys()

    def encode_encrypt(self, x: np.ndarray) -> bytes:
        """Pack x in the spec's input layout, encrypt (seeded), frame for the wire."""
        with self._lock:
            return wire.encode_ciphertexts(encode_encrypt_bytes(self.backend, self.spec, x))

    def decrypt_decode(self, body: bytes, max_item_bytes: int | None = None) -> np.ndarray:
        """Unframe output ciphertexts, decrypt, read the outputs from their layout."""
        items = wire.decode_ciphertexts(body, max_item_bytes=max_item_bytes)
        with self._lock:
            vectors = [self.backend.decrypt(self.backend.ciphertext_from_bytes(b))
                       for b in items]
        return self.spec.decode(vectors)
