"""What every kernel shares: the build context, level/scale bookkeeping and rotation helpers.

A kernel is built once per loaded model: it is given its input layout, level and scale, computes
its output layout, level and scale, and encodes its plaintexts at the level where they are used.
Plaintext weights are encoded at the scale of the prime the next rescale drops, so a
multiply-then-rescale returns exactly the input scale (no drift to correct later).
Calling it on ciphertexts runs it; it never decrypts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from heinfer.backends.base import Backend, Ciphertext, Plaintext
from heinfer.errors import DepthExhaustedError


@dataclass
class BuildContext:
    """Shared while building one plan's kernels: the backend used to encode, the rotation steps
    chosen so far (kernels prefer steps that already have a key) and whether to encode at all
    (a dry run only derives layouts, levels and key steps)."""

    backend: Backend
    encode_plaintexts: bool = True
    rotation_steps: set[int] = field(default_factory=set)

    @property
    def slots(self) -> int:
        return self.backend.slots

    @property
    def values_needed(self) -> bool:
        """False on a data-free backend: kernels then skip building mask vectors (they still
        call `encode(None, level, scale)` so levels and scales stay exact). Full-size networks
        plan and count in little memory this way."""
        return self.encode_plaintexts and not getattr(self.backend, "data_free", False)

    def encode(self, values: np.ndarray | None, level: int, scale: float) -> Plaintext | None:
        if not self.encode_plaintexts:
            return None
        return self.backend.encode(values, level, scale)

    def is_zero(self, pt: Plaintext | None) -> bool:
        """True when `pt` encoded to all-zero coefficients (values below the scale's
        resolution): SEAL refuses a product with it ('result ciphertext is transparent'), and it
        contributes nothing, so kernels skip it."""
        return pt is not None and self.values_needed and bool(
            self.backend.plaintext_is_zero(pt))

    def use_step(self, step: int) -> int:
        step %= self.slots
        if step:
            self.rotation_steps.add(step)
        return step


class Kernel:
    """Base class: subclasses set out_layout/out_level/out_scale in __init__ and define run()."""

    name = "kernel"
    # True when the kernel's output ciphertexts hold its output slots and zeros only
    masks_output = False

    def __init__(self, ctx: BuildContext, in_layout, level: int, scale: float):
        self.in_layout = in_layout
        self.in_level = level
        self.in_scale = scale
        self.out_layout = in_layout
        self.out_level = level
        self.out_scale = scale
        self.steps_used: set[int] = set()
        self.expected_ops: Counter[str] = Counter()

    def needs_levels(self, ctx: BuildContext, n: int) -> None:
        if self.in_level < n:
            raise DepthExhaustedError(
                f"{self.name} needs {n} more rescale(s) at level {self.in_level}: the plan is "
                f"deeper than the modulus chain ({ctx.backend.params.describe()}); add data "
                "primes (or a larger ring to afford them) or remove multiplicative depth"
            )

    def step(self, ctx: BuildContext, step: int) -> int:
        s = ctx.use_step(step)
        if s:
            self.steps_used.add(s)
        return s

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        raise NotImplementedError

    def __call__(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        return self.run(be, cts)

    def describe(self) -> str:
        return f"{self.name}: {self.in_layout} -> {self.out_layout}"


def plan_rotation_chain(ctx: BuildContext, kernel: Kernel,
                        offsets: list[int]) -> list[tuple[int, int, int]]:
    """Order the rotations of one ciphertext by `offsets` so that each is one rotation of an
    earlier result (or the source), preferring steps that already have keys: consecutive taps or
    baby steps then share one or two Galois keys instead of one key each.

    Returns (target offset, source offset, step) triples; offset 0 is the source itself."""
    slots = ctx.slots
    done = [0]
    chain = []
    for off in sorted({o for o in offsets if o % slots}, key=lambda o: (abs(o), o)):
        best = None
        for src in done:
            step = (off - src) % slots
            if step in ctx.rotation_steps:
                best = (src, step)
                break
        if best is None:
            src = min(done, key=lambda s: abs(off - s))
            best = (src, (off - src) % slots)
        kernel.step(ctx, best[1])
        chain.append((off, best[0], best[1]))
        done.append(off)
    return chain


def run_rotation_chain(be: Backend, ct: Ciphertext,
                       chain: list[tuple[int, int, int]]) -> dict[int, Ciphertext]:
    out = {0: ct}
    for off, src, step in chain:
        out[off] = be.rotate(out[src], step)
    return out


def rotate_and_sum(be: Backend, ct: Ciphertext, stride: int, count: int) -> Ciphertext:
    """Sum `count` (a power of two) blocks spaced `stride` apart into the first block."""
    k = count // 2
    while k >= 1:
        be.add_inplace(ct, be.rotate(ct, stride * k))
        k //= 2
    return ct


def rotate_and_sum_steps(ctx: BuildContext, kernel: Kernel, stride: int, count: int) -> None:
    k = count // 2
    while k >= 1:
        kernel.step(ctx, stride * k)
        k //= 2


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def constant_plaintext(ctx: BuildContext, value: float, level: int, scale: float,
                       slots_mask: np.ndarray | None = None) -> Plaintext | None:
    v = np.full(ctx.slots, float(value))
    if slots_mask is not None:
        v = v * slots_mask
    return ctx.encode(v, level, scale)


def masked_sum(be: Backend, rotated: list[dict], terms: list) -> Ciphertext | None:
    """sum of rotated[c][offset] * plaintext over terms (c, offset, plaintext), rescaled once;
    None when there are no terms. The inner sum of every baby-step/giant-step kernel."""
    acc = None
    for c, off, pt in terms:
        prod = be.multiply_plain(rotated[c][off], pt)
        if acc is None:
            acc = prod
        else:
            be.add_inplace(acc, prod)
    if acc is not None:
        be.rescale_inplace(acc)
    return acc


def horner(be: Backend, parts: list, step: int) -> Ciphertext | None:
    """sum_k rot(parts[k], k*step) with one Galois key, parts[k] possibly None (zero)."""
    acc = None
    for part in reversed(parts):
        if acc is not None:
            acc = be.rotate(acc, step)
        if part is not None:
            if acc is None:
                acc = part
            else:
                be.add_inplace(acc, part)
    return acc

