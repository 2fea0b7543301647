"""Sanitized outputs: the client's decryption no longer depends on the weights beyond the answer.

Two steps on each output ciphertext before it leaves the server (docs/SERVICE.md, "Threat
model"):

1. **Re-randomize**: add a fresh public-key encryption of zero (the client's public key, uploaded
   with its evaluation keys). Without it the output is a deterministic function of the weights
   and of what the client sent: its `c1` half alone (e.g. `c1 = w * c1_in` after one plaintext
   multiply) lets the client divide out the weights' polynomial.
2. **Flood**: add Gaussian noise that drowns the output's own noise (the deviation from the exact
   answer, which depends on the weights). The noise is sampled in the slots (real and imaginary
   parts independent, std `sigma`), which is i.i.d. Gaussian noise of std
   `sigma * scale * sqrt(2 / n)` on the polynomial's coefficients (the canonical embedding is
   orthogonal up to that factor), and added as a plaintext at the ciphertext's level and scale.

Size (Li, Micciancio, Schultz, Sorrell, "Securing approximate homomorphic encryption using
differential privacy", CRYPTO 2022; the bound without their refinement): for s bits of
statistical security over t decryptions of outputs whose noise is at most E per slot, flood with
std `E * 2^(s/2) * sqrt(64 t)`. E is six times the rms deviation the compiler measured for the
plan (`packing.privacy`). The flooding costs about s/2 + 3 + log2(t)/2 bits of precision: the
plan must have them (docs/COMPILER.md, "Sanitized outputs").

Randomness: SEAL's own CSPRNG for the encryption of zero, os.urandom for the flooding.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from heinfer.errors import LayoutError

DEFAULT_STAT_BITS = 30
# metadata entry of a sanitized plan
PRIVACY = "privacy"


class FloodSpec(BaseModel):
    """What a sanitized plan records (plan metadata `privacy`): everything the server needs to
    flood, in the units of the decoded output slots (before the spec's output scale)."""

    stat_bits: int = Field(DEFAULT_STAT_BITS, ge=1, le=128,
                           description="statistical security of the flooding, bits")
    queries: int = Field(1, ge=1, description="decryptions per key the bound covers")
    noise_rms: float = Field(gt=0, description="rms deviation of the output slots from the "
                             "exact answer, measured by the compiler")
    images: int = Field(ge=1, description="images the rms was measured on")

    @property
    def noise_bound(self) -> float:
        return 6.0 * self.noise_rms

    @property
    def sigma(self) -> float:
        """Flooding std per slot and part (real, imaginary)."""
        return flood_sigma(self.noise_bound, self.stat_bits, self.queries)


def flood_sigma(noise_bound: float, stat_bits: int, queries: int = 1) -> float:
    """E 2^(s/2) sqrt(64 t), rounded up to a power of two: the spec publishes it, and a power
    of two tells the client no more than the order of magnitude of the plan's noise."""
    raw = noise_bound * 2.0 ** (stat_bits / 2) * math.sqrt(64 * queries)
    return 2.0 ** math.ceil(math.log2(raw))


def gaussian(count: int) -> np.ndarray:
    """`count` independent standard normal samples from os.urandom (Box-Muller)."""
    pairs = (count + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64) >> np.uint64(11)
    u = raw.astype(np.float64) / float(1 << 53)              # uniform in [0, 1)
    r = np.sqrt(-2.0 * np.log1p(-u[:pairs]))                 # 1 - u in (0, 1]
    theta = 2.0 * np.pi * u[pairs:]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:count]


def check_room(params, level: int, scale: float, largest: float, sigma: float) -> None:
    """The output plus 8 sigma of flooding must fit the primes left at its level."""
    need = math.log2(scale) + math.log2(largest + 8 * sigma) + 1
    bits = sum(params.coeff_mod_bits[: level + 1])
    if need >= bits:
        raise LayoutError(
            f"flooding of std {sigma:.3g} on outputs up to {largest:.3g} at scale "
            f"2^{math.log2(scale):.1f} needs {need:.0f} bits, level {level} has {bits}: give "
            "the first prime more bits or lower the output scale")


class Sanitizer:
    """Sanitizes one session's outputs: the server's backend holding the client's public key."""

    def __init__(self, backend: Any, flood: FloodSpec | None):
        if getattr(backend, "public_key", None) is None:
            raise LayoutError("sanitizing needs the client's public key (upload it with the "
                              "evaluation keys)")
        self.backend = backend
        self.flood = flood

    def __call__(self, ct: Any) -> Any:
        be = self.backend
        out = be.add(ct, be.encrypt_zero_like(ct))
        if self.flood is not None:
            noise = gaussian(2 * be.slots) * self.flood.sigma
            values = noise[: be.slots] + 1j * noise[be.slots:]
            be.add_plain_inplace(out, be.encode(values, be.level(out), be.scale_of(out)))
        return out
