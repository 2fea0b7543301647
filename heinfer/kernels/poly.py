"""Polynomial activations at minimal depth.

`Square` is the degree-2 fast path: the plan builder rewrites a*x^2 + b*x + c as
a*(u^2 + c') with u = x + b/(2a) (the shift goes into the previous layer's bias) and the factor a
into the next linear layer's weights, so the kernel is one square, one rescale and a free
plaintext add of c' (depth 1). `Poly2` evaluates a*x^2 + b*x + c as (a*x + b)*x + c when no
folding is possible (depth 2).
"""

from __future__ import annotations

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.kernels.base import BuildContext, Kernel, constant_plaintext


class Square(Kernel):
    name = "square"

    def __init__(self, ctx: BuildContext, in_layout, level: int, scale: float,
                 constant: float = 0.0):
        super().__init__(ctx, in_layout, level, scale)
        self.needs_levels(ctx, 1)
        self.out_level = level - 1
        self.out_scale = scale * scale / ctx.backend.prime(level)
        self.expected_ops["square"] = in_layout.n_ct
        self.constant = None
        if constant:
            self.constant = constant_plaintext(ctx, constant, self.out_level, self.out_scale)

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        outs = []
        for ct in cts:
            sq = be.square(ct)
            be.rescale_inplace(sq)
            if self.constant is not None:
                be.add_plain_inplace(sq, self.constant)
            outs.append(sq)
        return outs


class Poly2(Kernel):
    name = "poly2"

    def __init__(self, ctx: BuildContext, coeffs: list[float], in_layout, level: int,
                 scale: float):
        super().__init__(ctx, in_layout, level, scale)
        self.needs_levels(ctx, 2)
        be = ctx.backend
        c0, c1, c2 = (list(coeffs) + [0.0, 0.0, 0.0])[:3]
        q1, q2 = be.prime(level), be.prime(level - 1)
        self.a = constant_plaintext(ctx, c2, level, q1)        # a*x, exact scale after rescale
        self.b = constant_plaintext(ctx, c1, level - 1, scale)
        self.out_level = level - 2
        self.out_scale = scale * scale / q2
        self.c = constant_plaintext(ctx, c0, self.out_level, self.out_scale) if c0 else None
        self.expected_ops["multiply"] = in_layout.n_ct

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        outs = []
        for ct in cts:
            t = be.multiply_plain(ct, self.a)
            be.rescale_inplace(t)
            be.add_plain_inplace(t, self.b)
            x = be.copy(ct)
            be.mod_switch_to_inplace(x, be.level(t))
            y = be.multiply(t, x)
            be.rescale_inplace(y)
            if self.c is not None:
                be.add_plain_inplace(y, self.c)
            outs.append(y)
        return outs


def fold_square(coeffs: list[float]) -> tuple[float, float, float] | None:
    """a*x^2 + b*x + c = a*((x + shift)^2 + const): returns (a, shift, const), None if a ~ 0."""
    c0, c1, c2 = (list(coeffs) + [0.0, 0.0, 0.0])[:3]
    if len(coeffs) > 3 and any(coeffs[3:]):
        return None
    if abs(c2) < 1e-12:
        return None
    shift = c1 / (2 * c2)
    const = (c0 - c1 * c1 / (4 * c2)) / c2
    return c2, shift, const


__all__ = ["Square", "Poly2", "fold_square", "np"]
