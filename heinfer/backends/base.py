"""The backend interface: exactly the CKKS operations the kernels need, nothing more.

Kernels never import a backend; they receive an object with this shape. Ciphertexts and
plaintexts are the backend's native objects (opaque to kernels). Levels count down: a fresh
ciphertext is at `params.top_level`, the last usable level is 0.

Keys go through the backend too: the client makes them (`generate_keys`, `make_eval_keys`), the
server loads and validates them (`load_eval_keys`, `with_eval_keys`); server/ and client/ never
import a SEAL binding. The secret key never leaves its backend unless asked for by name
(`secret_key_bytes`, for the client's key store).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from heinfer.params import CKKSParams

Ciphertext = Any
Plaintext = Any


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's Galois element for a left rotation by `step` slots (negative: right)."""
    n = poly_modulus_degree
    slots = n // 2
    step %= slots
    return pow(3, step, 2 * n)


def check_encode_scale(params: CKKSParams, level: int, scale: float) -> None:
    """Refuse a scale the level cannot hold, with a message instead of SEAL's bare one."""
    from heinfer.errors import ScaleMismatchError

    bits = sum(params.coeff_mod_bits[: level + 1])
    if not scale > 0 or np.log2(scale) >= bits:
        raise ScaleMismatchError(
            f"cannot encode at scale 2^{np.log2(scale) if scale > 0 else float('nan'):.1f} at "
            f"level {level}, which has {bits} bits of modulus left; encode at a lower scale or "
            "a higher level"
        )


def check_same_level_and_scale(what: str, la: int | None, lb: int | None, sa: float,
                               sb: float) -> None:
    """Operands of an addition must share level and scale (SEAL would only say 'mismatch')."""
    from heinfer.errors import ScaleMismatchError

    if la != lb:
        raise ScaleMismatchError(f"{what}: operands at levels {la} and {lb}; mod-switch the "
                                 "higher one down first")
    if abs(sa - sb) > 1e-6 * max(sa, sb):
        raise ScaleMismatchError(
            f"{what}: scales 2^{np.log2(sa):.4f} and 2^{np.log2(sb):.4f} differ; encode the "
            "plaintext at the ciphertext's scale or rescale both the same way"
        )


def check_room(params: CKKSParams, level: int, scale: float, what: str) -> None:
    """A product's scale must fit the primes left at its level (else SEAL's bare
    'scale out of bounds')."""
    from heinfer.errors import DepthExhaustedError

    bits = sum(params.coeff_mod_bits[: level + 1])
    if np.log2(scale) >= bits - 1:
        raise DepthExhaustedError(
            f"{what}: result scale 2^{np.log2(scale):.1f} needs more than the {bits} bits "
            f"left at level {level}; the plan is deeper than the modulus chain "
            f"({params.describe()}). Add primes, use a larger ring, or reduce depth."
        )


def check_rescale(params: CKKSParams, level: int, scale: float, prime: int) -> None:
    """A rescale needs a prime left to drop and a scale that stays above 1 after it."""
    from heinfer.errors import DepthExhaustedError, ScaleMismatchError

    if level == 0:
        raise DepthExhaustedError(
            f"rescale at level 0: the computation needs more multiplicative depth than "
            f"{params.describe()} offers; add data primes or reduce the plan's depth"
        )
    if scale / prime < 2.0:
        raise ScaleMismatchError(
            f"rescale would drop the scale 2^{np.log2(scale):.1f} below 1 (prime "
            f"2^{np.log2(prime):.1f}); multiply before rescaling"
        )


def secret_key_bound(params: CKKSParams) -> int:
    """Largest serialized SecretKey for these parameters (one polynomial over all primes,
    uncompressed, plus metadata): only sections this small are probed as secret keys."""
    return params.poly_modulus_degree * len(params.coeff_mod_bits) * 8 + 4096


@dataclass
class EvalKeyBytes:
    """What a client sends so a server can evaluate: serialized (seeded) public material only."""

    relin_keys: bytes
    galois_keys: bytes
    rotation_steps: list[int] = field(default_factory=list)

    def nbytes(self) -> int:
        return len(self.relin_keys) + len(self.galois_keys)


@runtime_checkable
class Backend(Protocol):
    params: CKKSParams

    @property
    def slots(self) -> int: ...

    # -- keys: every key operation goes through here (server/ and client/ never touch SEAL) --
    def generate_keys(self, rotation_steps: Iterable[int]) -> EvalKeyBytes:
        """Client: a new secret key, and evaluation keys for exactly these steps (loaded too)."""
        ...

    def make_eval_keys(self, rotation_steps: Iterable[int]) -> EvalKeyBytes:
        """Client: evaluation keys from the secret key already held (e.g. from a key store)."""
        ...

    def secret_key_bytes(self) -> bytes: ...

    def load_secret_key(self, data: bytes) -> None: ...

    def load_eval_keys(self, keys: EvalKeyBytes, public_key: bytes | None = None) -> None:
        """Server: load and validate uploaded keys. Raises SecretKeyError when a section is a
        secret key, ParamsMismatchError when one does not load under `params` (or another SEAL
        version wrote it), MissingKeyError when the power-2 relinearization key or a Galois key
        for one of `keys.rotation_steps` is absent."""
        ...

    def with_eval_keys(self, keys: EvalKeyBytes,
                       public_key: bytes | None = None) -> Backend:
        """Server: a backend sharing this one's context and encoded plaintexts that holds
        `keys` (validated as by `load_eval_keys`): one per session."""
        ...

    def drop_eval_keys(self) -> None:
        """Free the (large) evaluation keys."""
        ...

    # -- encoding -------------------------------------------------------------------------
    def encode(self, values: np.ndarray, level: int, scale: float) -> Plaintext: ...

    def encode_scalar(self, value: float, level: int, scale: float) -> Plaintext: ...

    def plaintext_is_zero(self, p: Plaintext) -> bool:
        """True when the encoding rounded every coefficient to 0: SEAL refuses to multiply by
        it (the product would be 'transparent'), and it contributes nothing anyway."""
        ...

    # -- client side (needs the secret key) ------------------------------------------------
    def encrypt(self, values: np.ndarray) -> Ciphertext: ...

    def decrypt(self, ct: Ciphertext) -> np.ndarray: ...

    # -- evaluation ----------------------------------------------------------------------
    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext: ...

    def add_inplace(self, a: Ciphertext, b: Ciphertext) -> None: ...

    def add_plain_inplace(self, a: Ciphertext, p: Plaintext) -> None: ...

    def multiply_plain(self, a: Ciphertext, p: Plaintext) -> Ciphertext: ...

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """Ciphertext product, relinearized."""
        ...

    def square(self, a: Ciphertext) -> Ciphertext:
        """Ciphertext square, relinearized."""
        ...

    def rescale_inplace(self, a: Ciphertext) -> None: ...

    def mod_switch_to_inplace(self, a: Ciphertext, level: int) -> None: ...

    def rotate(self, a: Ciphertext, step: int) -> Ciphertext: ...

    def level(self, a: Ciphertext) -> int: ...

    def scale_of(self, a: Ciphertext) -> float: ...

    def prime(self, level: int) -> int:
        """The data prime that a rescale at `level` drops."""
        ...

    # -- bytes ---------------------------------------------------------------------------
    def ciphertext_to_bytes(self, ct: Ciphertext) -> bytes: ...

    def ciphertext_from_bytes(self, data: bytes) -> Ciphertext: ...
