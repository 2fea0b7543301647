"""A backend that computes in the clear: ciphertexts are (slot values, level, scale) records.

Running a plan's kernels on it gives the plan's exact output without CKKS noise (every packing,
rotation and folded constant included) and, on the way, the *range analysis*: for each kernel,
the largest |slot value| x scale against the modulus left at its level. CKKS wraps silently
when a value times its scale reaches half the modulus (the coefficients of a plaintext are
bounded by its largest slot, so the slot bound is a safe one), and junk slots count as much as
the ones a kernel reads: an overflow anywhere corrupts every slot. This is the compiler's cheap
check for overflow before it happens (heinfer.check); the real check runs CKKS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from heinfer.backends.symbolic import SymbolicBackend


@dataclass
class PlainText:
    values: np.ndarray
    level: int
    scale: float


@dataclass
class RangeRecord:
    """Per kernel (`label`): the smallest headroom seen, in bits, and where."""

    label: str
    margin_bits: float = math.inf
    max_abs: float = 0.0
    level: int = 0
    scale_bits: float = 0.0


@dataclass
class RangeLog:
    records: dict[str, RangeRecord] = field(default_factory=dict)
    label: str = "input"

    def note(self, values: np.ndarray, level: int, scale: float, modulus_bits: list[float]):
        m = float(np.max(np.abs(values))) if values.size else 0.0
        room = sum(modulus_bits[: level + 1]) - 1.0  # |v| * scale < Q_level / 2
        margin = room - (math.log2(m) if m > 0 else -math.inf) - math.log2(scale)
        rec = self.records.setdefault(self.label, RangeRecord(self.label))
        if margin < rec.margin_bits:
            rec.margin_bits, rec.level, rec.scale_bits = margin, level, math.log2(scale)
        rec.max_abs = max(rec.max_abs, m)

    def worst(self) -> RangeRecord | None:
        return min(self.records.values(), key=lambda r: r.margin_bits, default=None)


class PlainBackend(SymbolicBackend):
    name = "plain"
    data_free = False

    def __init__(self, params):
        super().__init__(params)
        self._bits = [math.log2(self._primes[lv]) for lv in range(len(self._primes))]
        self.log = RangeLog()

    def _out(self, values: np.ndarray, level: int, scale: float) -> PlainText:
        self.log.note(values, level, scale, self._bits)
        return PlainText(values, level, float(scale))

    def generate_keys(self, rotation_steps):
        self.rotation_steps = None  # every step: composition is exact in the clear
        return super().generate_keys([])

    def encode(self, values, level: int, scale: float) -> PlainText:
        v = np.real(np.asarray(values, dtype=np.complex128)) if values is not None else None
        return PlainText(np.zeros(self.slots) if v is None else v.astype(np.float64), level,
                         float(scale))

    def encode_scalar(self, value: float, level: int, scale: float) -> PlainText:
        return PlainText(np.full(self.slots, float(value)), level, float(scale))

    def plaintext_is_zero(self, pt: PlainText) -> bool:
        return not np.any(pt.values)

    def encrypt(self, values) -> PlainText:
        return self._out(np.asarray(values, dtype=np.float64).copy(), self.params.top_level,
                         self.params.scale)

    def decrypt(self, ct: PlainText) -> np.ndarray:
        return ct.values.copy()

    def add(self, a, b):
        self._same(a, b, "add")
        return self._out(a.values + b.values, a.level, a.scale)

    def sub(self, a, b):
        self._same(a, b, "sub")
        return self._out(a.values - b.values, a.level, a.scale)

    def add_inplace(self, a, b) -> None:
        self._same(a, b, "add")
        a.values = a.values + b.values
        self.log.note(a.values, a.level, a.scale, self._bits)

    def add_plain_inplace(self, a, p) -> None:
        self._same(a, p, "add_plain")
        a.values = a.values + p.values
        self.log.note(a.values, a.level, a.scale, self._bits)

    def multiply_plain(self, a, p):
        super().multiply_plain(a, p)  # level and room checks
        return self._out(a.values * p.values, a.level, a.scale * p.scale)

    def multiply(self, a, b):
        super().multiply(a, b)
        return self._out(a.values * b.values, a.level, a.scale * b.scale)

    def square(self, a):
        return self.multiply(a, a)

    def rescale_inplace(self, a) -> None:
        super().rescale_inplace(a)

    def rotate(self, a, step: int):
        super().rotate(a, step)
        return PlainText(np.roll(a.values, -(step % self.slots)), a.level, a.scale)

    def copy(self, a):
        return PlainText(a.values.copy(), a.level, a.scale)


class NoisyPlainBackend(PlainBackend):
    """`PlainBackend` plus a model of CKKS's errors, for plans too large to check by a real run
    (heinfer.check's "modelled" method). Gaussian errors, in slot units divided by the scale:

    - encoding a vector rounds its N coefficients: std sqrt(N/12) (a constant in every slot
      rounds one coefficient: uniform +-0.5);
    - fresh encryption adds std 3.2 per coefficient: 3.2 sqrt(N) in the slots;
    - a rescale rounds, and the rounding meets the ternary secret (about 2N/3 non-zeros):
      sqrt(N) sqrt((1 + 2N/3) / 12);
    - key switching (rotation, relinearization) adds about a rescale's error, more when the
      largest prime left approaches the special prime (rough: not fitted to SEAL).

    The figures are standard estimates, not measurements, scaled by `SAFETY` so that the model
    errs on the safe side: on issue #11's sigmoid/tanh model the unscaled estimates came to
    0.7-0.8x the errors real runs measured. The real CKKS check stays the default.
    """

    SAFETY = 1.5

    name = "plain+noise"

    def __init__(self, params, seed: int = 0):
        super().__init__(params)
        n = params.poly_modulus_degree
        self.rng = np.random.default_rng(seed)
        self.sd_encode = math.sqrt(n / 12)
        self.sd_fresh = 3.2 * math.sqrt(n)
        self.sd_rescale = math.sqrt(n) * math.sqrt((1 + 2 * n / 3) / 12)
        self._special_bits = params.coeff_mod_bits[-1]

    def _noise(self, sd: float, scale: float) -> np.ndarray:
        return self.rng.normal(0.0, self.SAFETY * sd / scale, self.slots)

    def _key_switch_sd(self, level: int) -> float:
        ratio = 2.0 ** (max(self._bits[: level + 1]) - self._special_bits)
        return self.sd_rescale * (1.0 + math.sqrt(level + 1) * ratio)

    def encode(self, values, level: int, scale: float) -> PlainText:
        pt = super().encode(values, level, scale)
        pt.values = pt.values + self._noise(self.sd_encode, scale)
        return pt

    def encode_scalar(self, value: float, level: int, scale: float) -> PlainText:
        return PlainText(np.full(self.slots, float(value) + self.rng.uniform(-0.5, 0.5) / scale),
                         level, float(scale))

    def encrypt(self, values) -> PlainText:
        ct = super().encrypt(values)
        ct.values = ct.values + self._noise(math.hypot(self.sd_encode, self.sd_fresh), ct.scale)
        return ct

    def rescale_inplace(self, a) -> None:
        super().rescale_inplace(a)
        a.values = a.values + self._noise(self.sd_rescale, a.scale)

    def multiply(self, a, b):
        out = super().multiply(a, b)
        out.values = out.values + self._noise(self._key_switch_sd(out.level), out.scale)
        return out

    def rotate(self, a, step: int):
        out = super().rotate(a, step)
        if step % self.slots:
            out.values = out.values + self._noise(self._key_switch_sd(out.level), out.scale)
        return out
