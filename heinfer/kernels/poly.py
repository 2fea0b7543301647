"""Polynomial activations at minimal depth.

`Square` is the degree-2 fast path: the plan builder rewrites a*x^2 + b*x + c as
a*(u^2 + c') with u = x + b/(2a) (the shift goes into the previous layer's bias) and the factor a
into the next linear layer's weights, so the kernel is one square, one rescale and a free
plaintext add of c' (depth 1). `Poly2` evaluates a*x^2 + b*x + c as (a*x + b)*x + c when no
folding is possible (depth 2). `PolyEval` evaluates any degree d >= 1 at depth
floor(log2 d) + 1 = ceil(log2(d + 1)), the least a polynomial whose coefficients are plaintexts
can take (docs/COMPILER.md, "Polynomials of any degree").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from heinfer.backends.base import Backend, Ciphertext, Plaintext
from heinfer.errors import LayoutError, ScaleMismatchError
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


def effective_coeffs(coeffs: list[float]) -> list[float]:
    """The coefficients without trailing zeros (c0 always kept)."""
    c = [float(v) for v in coeffs] or [0.0]
    while len(c) > 1 and c[-1] == 0.0:
        c.pop()
    return c


def poly_depth(coeffs: list[float]) -> int:
    """Levels `PolyEval` consumes for these coefficients: floor(log2 d) + 1 for degree d >= 1
    (degree 3: 2, 4..7: 3, 8..15: 4)."""
    return (len(effective_coeffs(coeffs)) - 1).bit_length()


def _same_scale(a: float, b: float) -> bool:
    """SEAL's own test for equal scales (`util::are_close`): within about one ulp."""
    return abs(a - b) < np.finfo(np.float64).eps * max(abs(a), abs(b), 1.0)


def _toward(x: float, got: float, want: float) -> float:
    return float(np.nextafter(x, math.inf if got < want else -math.inf))


def _encode_scale_for(ct_scale: float, target: float, tries: int = 16) -> float:
    """A plaintext scale e with ct_scale * e == target in double arithmetic (what SEAL computes
    for multiply_plain), or the closest one found within a few ulps of target / ct_scale."""
    e = best = target / ct_scale
    for _ in range(tries):
        got = ct_scale * e
        if got == target:
            return e
        if abs(got - target) < abs(ct_scale * best - target):
            best = e
        e = _toward(e, got, target)
    return best


@dataclass
class _Term:
    """x^(2^j) times a plaintext coefficient (`child` None) or times the ciphertext of a
    lower-degree polynomial (`child`), at the level above its node's output."""

    j: int
    scale: float                      # the product's scale, before the node's rescale
    coeff: float = 0.0
    encode_scale: float = 0.0
    child: _Node | None = None
    pt: Plaintext | None = None


@dataclass
class _Node:
    """sum of terms at level + 1, one rescale, then + const: a polynomial at (level, scale)."""

    level: int
    terms: list[_Term]
    scale: float                      # output scale, bit-exact as SEAL computes it
    const: float = 0.0
    const_pt: Plaintext | None = None

    def walk(self):
        yield self
        for t in self.terms:
            if t.child is not None:
                yield from t.child.walk()


class PolyEval(Kernel):
    """p(x) = c0 + c1 x + ... + cd x^d on every slot, for any degree d >= 1, at depth
    floor(log2 d) + 1.

    Powers x^(2^j) (j = 1..J, J = floor(log2 d)) come by repeated squaring, x^(2^j) at level
    L - j. Then p = c0 + c1 x + sum_j x^(2^j) q_j(x) with q_j = c[2^j .. 2^(j+1) - 1], each q_j
    of degree < 2^j evaluated the same way one level higher (depth <= j), so every product
    x^(2^j) q_j is at depth j + 1 <= J + 1. A constant q_j is a plaintext multiply.

    Scales: every node sums its terms at one level, rescales once, then adds its constant. The
    terms' scales must be equal (SEAL refuses to add otherwise): each coefficient is encoded at
    the scale e with (scale of x^(2^j)) * e == the node's pre-rescale scale, exactly in double
    arithmetic as SEAL computes it; a ciphertext factor q_j is built to the scale that makes its
    product match. The output scale is the input scale / 2^scale_down_bits (give or take an
    ulp; `out_scale` is the exact value), so a later linear layer sees the scale it would have
    seen without the activation; `scale_down_bits` lowers it for free (the coefficients are
    encoded lower) when a last layer without rescale needs room."""

    name = "poly"

    def __init__(self, ctx: BuildContext, coeffs: list[float], in_layout, level: int,
                 scale: float, scale_down_bits: int = 0):
        super().__init__(ctx, in_layout, level, scale)
        self.coeffs = effective_coeffs(coeffs)
        self.degree = len(self.coeffs) - 1
        if self.degree < 1:
            raise LayoutError(f"poly: constant activation {self.coeffs} (degree 0) has no "
                              "ciphertext to compute: fold it into the next layer's bias")
        self.name = f"poly d{self.degree}"  # the report and profiles show the degree
        self.depth = poly_depth(self.coeffs)
        self.needs_levels(ctx, self.depth)
        self.n_squares = self.depth - 1
        be = ctx.backend
        self._prime = be.prime
        # scales of x^(2^j), as SEAL computes them: square, then rescale
        self.power_scales = [float(scale)]
        for j in range(1, self.n_squares + 1):
            s = self.power_scales[-1]
            self.power_scales.append(s * s / be.prime(level - j + 1))
        self.tree = self._node(self.coeffs, level - self.depth, scale / 2.0**scale_down_bits)
        self.out_level = self.tree.level
        self.out_scale = self.tree.scale
        for node in self.tree.walk():
            if node.const:
                node.const_pt = constant_plaintext(ctx, node.const, node.level, node.scale)
            for t in node.terms:
                if t.child is None:
                    t.pt = constant_plaintext(ctx, t.coeff, node.level + 1, t.encode_scale)
        nodes = list(self.tree.walk())
        n = in_layout.n_ct
        products = sum(t.child is not None for nd in nodes for t in nd.terms)
        plains = sum(t.child is None for nd in nodes for t in nd.terms)
        self.expected_ops.update({"square": self.n_squares * n, "multiply": products * n,
                                  "multiply_plain": plains * n,
                                  "rescale": (self.n_squares + len(nodes)) * n})

    # -- planning (scales only, no ciphertexts) -----------------------------------------------
    def _node(self, coeffs: list[float], level: int, want: float) -> _Node:
        """Plan coeffs (degree >= 1) evaluated to (level, about `want`)."""
        q = self._prime(level + 1)
        parts: list[tuple[int, list[float]]] = []
        if len(coeffs) > 1 and coeffs[1] != 0.0:
            parts.append((0, [coeffs[1]]))
        j = 1
        while 2**j < len(coeffs):
            sub = effective_coeffs(coeffs[2**j: 2 ** (j + 1)])
            if any(sub):
                parts.append((j, sub))
            j += 1
        # products first: their scale is the hardest to move, so the first fixes the node's
        # scale and the others (children re-planned) and the plaintext terms follow it
        parts.sort(key=lambda p: len(p[1]) == 1)
        target = want * q
        terms: list[_Term] = []
        for j, sub in parts:
            if self.in_level - j < level + 1:
                raise AssertionError("poly: power below the level it is needed at")
            s = self.power_scales[j]
            if len(sub) == 1:
                e = _encode_scale_for(s, target)
                term = _Term(j, s * e, coeff=sub[0], encode_scale=e)
            else:
                child = self._child(sub, level + 1, s, target)
                term = _Term(j, s * child.scale, child=child)
            if not terms:
                target = term.scale
            elif not _same_scale(term.scale, target):
                raise ScaleMismatchError(
                    f"poly: cannot align the scales of x^{2**j}'s term (2^"
                    f"{math.log2(term.scale):.6f}) and the first term's (2^"
                    f"{math.log2(target):.6f}) at level {level + 1}")
            terms.append(term)
        return _Node(level, terms, target / q, coeffs[0])

    def _child(self, sub: list[float], level: int, power_scale: float, target: float,
               tries: int = 16) -> _Node:
        """Plan `sub` at `level` so that power_scale * (its scale) == target exactly (or as
        close as a few ulps of nudging the requested scale get)."""
        want = target / power_scale
        best = None
        for _ in range(tries):
            node = self._node(sub, level, want)
            got = power_scale * node.scale
            if best is None or abs(got - target) < abs(power_scale * best.scale - target):
                best = node
            if got == target:
                break
            want = _toward(want, got, target)
        return best

    # -- evaluation ----------------------------------------------------------------------------
    def _eval(self, be: Backend, node: _Node, at) -> Ciphertext:
        acc = None
        for t in node.terms:
            p = at(t.j, node.level + 1)
            if t.child is None:
                y = be.multiply_plain(p, t.pt)
            else:
                y = be.multiply(p, self._eval(be, t.child, at))
            if acc is None:
                acc = y
            else:
                be.add_inplace(acc, y)
        be.rescale_inplace(acc)
        if node.const:
            be.add_plain_inplace(acc, node.const_pt)
        return acc

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        outs = []
        for ct in cts:
            powers = [ct]
            for _ in range(self.n_squares):
                p = be.square(powers[-1])
                be.rescale_inplace(p)
                powers.append(p)
            cache: dict[tuple[int, int], Ciphertext] = {}

            def at(j: int, level: int, powers=powers, cache=cache) -> Ciphertext:
                """x^(2^j) at `level` (mod-switched copies made once per level)."""
                p = powers[j]
                if be.level(p) == level:
                    return p
                if (j, level) not in cache:
                    c = be.copy(p)
                    be.mod_switch_to_inplace(c, level)
                    cache[(j, level)] = c
                return cache[(j, level)]

            outs.append(self._eval(be, self.tree, at))
        return outs

    def describe(self) -> str:
        return f"{self.name} (depth {self.depth}): {self.in_layout} -> {self.out_layout}"


__all__ = ["Square", "Poly2", "PolyEval", "fold_square", "poly_depth", "effective_coeffs", "np"]
