"""A backend without data: ciphertexts are (level, scale) records. Running a plan's kernels on it
gives the exact HE operation counts by level in milliseconds, with the same level and scale
checks as the real backends (the compiler's report and cost model use it; correctness tests never
do: they run real CKKS)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from heinfer.backends.base import EvalKeyBytes
from heinfer.errors import DepthExhaustedError, MissingKeyError, ScaleMismatchError
from heinfer.params import CKKSParams


@dataclass
class SymbolicText:
    level: int
    scale: float


class SymbolicBackend:
    name = "symbolic"
    data_free = True  # encode() ignores values: kernels may pass None (BuildContext.values_needed)

    def __init__(self, params: CKKSParams):
        self.params = params
        primes = seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bits))
        data = [p.value() for p in primes[:-1]]
        self._primes = {level: data[level] for level in range(len(data))}
        self.rotation_steps: set[int] | None = None  # None: any step (counting only)

    @property
    def slots(self) -> int:
        return self.params.slots

    def prime(self, level: int) -> int:
        return self._primes[level]

    def level(self, ct: SymbolicText) -> int:
        return ct.level

    def scale_of(self, ct: SymbolicText) -> float:
        return ct.scale

    def generate_keys(self, rotation_steps) -> EvalKeyBytes:
        self.rotation_steps = {s % self.slots for s in rotation_steps}
        return EvalKeyBytes(b"", b"", sorted(self.rotation_steps))

    def encode(self, values: np.ndarray, level: int, scale: float) -> SymbolicText:
        return SymbolicText(level, float(scale))

    def encode_scalar(self, value: float, level: int, scale: float) -> SymbolicText:
        return SymbolicText(level, float(scale))

    def plaintext_is_zero(self, p: SymbolicText) -> bool:
        return False

    def encrypt(self, values: np.ndarray) -> SymbolicText:
        return SymbolicText(self.params.top_level, self.params.scale)

    def _same(self, a: SymbolicText, b: SymbolicText, what: str) -> None:
        if a.level != b.level or abs(a.scale - b.scale) > 1e-6 * max(a.scale, b.scale):
            raise ScaleMismatchError(f"{what}: operands at (level {a.level}, 2^"
                                     f"{np.log2(a.scale):.3f}) and (level {b.level}, 2^"
                                     f"{np.log2(b.scale):.3f})")

    def add(self, a, b):
        self._same(a, b, "add")
        return SymbolicText(a.level, a.scale)

    def add_inplace(self, a, b) -> None:
        self._same(a, b, "add")

    sub = add

    def add_plain_inplace(self, a, p) -> None:
        self._same(a, p, "add_plain")

    def _room(self, level: int, scale: float, what: str) -> None:
        if np.log2(scale) >= sum(self.params.coeff_mod_bits[: level + 1]) - 1:
            raise DepthExhaustedError(f"{what}: scale 2^{np.log2(scale):.1f} exceeds the modulus "
                                      f"at level {level}")

    def multiply_plain(self, a, p):
        if a.level != p.level:
            raise ScaleMismatchError("multiply_plain: plaintext encoded for another level")
        self._room(a.level, a.scale * p.scale, "multiply_plain")
        return SymbolicText(a.level, a.scale * p.scale)

    def multiply(self, a, b):
        if a.level != b.level:
            raise ScaleMismatchError("multiply: operands at different levels")
        self._room(a.level, a.scale * b.scale, "multiply")
        return SymbolicText(a.level, a.scale * b.scale)

    def square(self, a):
        return self.multiply(a, a)

    def rescale_inplace(self, a) -> None:
        if a.level == 0:
            raise DepthExhaustedError("rescale at level 0: the plan is deeper than the chain")
        a.scale /= self._primes[a.level]
        a.level -= 1

    def mod_switch_to_inplace(self, a, level: int) -> None:
        a.level = level

    def rotate(self, a, step: int):
        step %= self.slots
        if self.rotation_steps is not None and step and step not in self.rotation_steps:
            raise MissingKeyError(f"no Galois key for rotation step {step}")
        return SymbolicText(a.level, a.scale)

    def copy(self, a):
        return SymbolicText(a.level, a.scale)
