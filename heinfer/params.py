"""CKKS parameters and the 128-bit security table.

A modulus chain is written as SEAL writes it: `coeff_mod_bits = [q0, q1, ..., q_{L-1}, special]`.
The last prime is the special key-switching prime; the other L primes carry data. A fresh
ciphertext sits at level L-1 and every rescale drops one prime, so the chain allows L-1 rescales
(the multiplicative depth). The result is decrypted at level >= 0 with q0 left: q0 must exceed the
scale by the bits the output values need.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from heinfer.errors import InsecureParamsError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secret (as in SEAL):
# maximum total bits of the coefficient modulus, special prime included, per ring degree.
MAX_LOG_Q_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CKKSParams(BaseModel):
    """Ring degree, modulus chain and scale. Refuses anything below 128-bit security unless
    built with `CKKSParams.insecure_for_tests(...)`, which says so in every error and spec."""

    model_config = ConfigDict(frozen=True)

    poly_modulus_degree: int = Field(description="ring degree n; n/2 complex slots")
    coeff_mod_bits: list[int] = Field(description="bit sizes of the primes, special prime last")
    scale_bits: int = Field(description="log2 of the encoding scale")
    insecure: bool = Field(default=False, description="explicitly requested test parameters")

    @model_validator(mode="after")
    def _check(self) -> CKKSParams:
        n, bits = self.poly_modulus_degree, self.coeff_mod_bits
        if n < 1024 or n & (n - 1):
            raise InsecureParamsError(f"ring degree {n} is not a power of two >= 1024")
        if len(bits) < 2:
            raise InsecureParamsError("the modulus chain needs at least one data prime and the "
                                      "special prime")
        if any(b < 17 or b > 60 for b in bits):
            raise InsecureParamsError(f"prime sizes must be within 17..60 bits, got {bits}")
        if not 10 <= self.scale_bits <= 60:
            raise InsecureParamsError(f"scale 2^{self.scale_bits} is outside 2^10..2^60")
        if not self.insecure:
            limit = MAX_LOG_Q_128.get(n)
            if limit is None or sum(bits) > limit:
                raise InsecureParamsError(
                    f"n={n} with {sum(bits)} bits of modulus is below 128-bit security "
                    f"(maximum {limit} bits for n={n}; table: {MAX_LOG_Q_128}). Use a larger ring "
                    "degree or fewer/smaller primes; for tests only, "
                    "CKKSParams.insecure_for_tests(...)."
                )
        return self

    @classmethod
    def insecure_for_tests(cls, poly_modulus_degree: int, coeff_mod_bits: list[int],
                           scale_bits: int) -> CKKSParams:
        """Parameters that skip the security check: small rings for fast tests, never production."""
        return cls(poly_modulus_degree=poly_modulus_degree, coeff_mod_bits=coeff_mod_bits,
                   scale_bits=scale_bits, insecure=True)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> int:
        return len(self.coeff_mod_bits) - 1

    @property
    def top_level(self) -> int:
        """Level of a fresh ciphertext (chain index in SEAL's terms)."""
        return self.data_primes - 1

    @property
    def depth(self) -> int:
        """Number of rescales the chain allows."""
        return self.data_primes - 1

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def security_bits(self) -> int:
        """128 when within the table, 0 when insecure (we do not estimate in between)."""
        limit = MAX_LOG_Q_128.get(self.poly_modulus_degree)
        return 128 if limit is not None and sum(self.coeff_mod_bits) <= limit else 0

    def describe(self) -> str:
        tag = " INSECURE (tests only)" if self.security_bits() < 128 else " 128-bit"
        return (f"n={self.poly_modulus_degree}, primes {self.coeff_mod_bits} "
                f"({sum(self.coeff_mod_bits)} bits), scale 2^{self.scale_bits}, "
                f"depth {self.depth},{tag}")

    def max_output_bits(self) -> float:
        """Bits available above the scale at level 0 (signed output magnitude bound)."""
        return self.coeff_mod_bits[0] - self.scale_bits - 1 + math.log2(1.0)
