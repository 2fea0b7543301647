"""Layout conversion: move every element of a strided grid to a compact one (one level).

Pooling and strided convolutions keep their outputs in place with wider strides, so a pooled map
uses a quarter (then a sixteenth...) of its block. That is free until a wide layer follows: its
cost grows with the number of ciphertexts, and blocks that do not divide the slots lose the
cyclic block diagonals. `Compact` rewrites the grid with H*W elements per block of
next_pow2(H*W) slots, row stride W, column stride 1 (CHW), or with the channels interleaved
(HWC: channel c at column offset c); the compiler prices both.

Element e moves from source slot s_e to destination slot d_e, a rotation by s_e - d_e. With
shift = b + g (b = shift mod M, baby steps on each source ciphertext, shared; g on the rescaled
inner sums of each destination ciphertext, giant steps):

    out_q = sum_g rot( sum_{p, b} rot(x_p, b) * mask[q, g, p, b], g )

M (a power of two) is chosen by counting baby and giant rotations. The masks are 0/1 encoded at
the prime the rescale drops, so the scale is unchanged and the conversion costs one level.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.kernels.base import (
    BuildContext,
    Kernel,
    horner,
    masked_sum,
    next_pow2,
    plan_rotation_chain,
    run_rotation_chain,
)
from heinfer.layout import GridLayout


def compact_layout(layout: GridLayout, interleaved: bool = False) -> GridLayout:
    """Dense grid: channel blocks of next_pow2(H*W) slots (CHW, cyclic block diagonals for the
    next convolution), or `interleaved` channels (HWC: channel c at column offset c, k channels
    per ciphertext with k*H*W <= slots)."""
    c, h, w = layout.shape
    if interleaved:
        k = min(c, layout.slots // (h * w))
        if k < 1:
            raise LayoutError(f"one channel of {layout} does not fit {layout.slots} slots")
        return GridLayout(layout.shape, layout.slots, k, 1, k * w, k)
    block = next_pow2(h * w)
    if block > layout.slots:
        raise LayoutError(f"one channel of {layout} does not fit {layout.slots} slots")
    return GridLayout(layout.shape, layout.slots, min(c, layout.slots // block), block, w, 1)


def slot_use(layout: GridLayout) -> float:
    """Fraction of the slots of its ciphertexts a grid layout's elements occupy."""
    return layout.size / (layout.n_ct * layout.slots)


class Compact(Kernel):
    name = "compact"

    def __init__(self, ctx: BuildContext, in_layout: GridLayout, level: int, scale: float,
                 baby: int | None = None, interleaved: bool = False):
        super().__init__(ctx, in_layout, level, scale)
        if not isinstance(in_layout, GridLayout):
            raise LayoutError(f"compact needs a grid layout, got {in_layout}")
        self.needs_levels(ctx, 1)
        slots = ctx.slots
        self.out_layout = compact_layout(in_layout, interleaved)
        src_ct, src = in_layout.positions()
        dst_ct, dst = self.out_layout.positions()
        shift = (src - dst) % slots
        n_in, n_out = in_layout.n_ct, self.out_layout.n_ct

        def cost(m: int) -> float:
            babies = sum(len(np.unique(shift[src_ct == p] % m)) for p in range(n_in))
            giants = sum(int(np.ptp(shift[dst_ct == q] // m)) + 1 for q in range(n_out))
            return babies + giants

        options = [baby] if baby else [1 << k for k in range(slots.bit_length())]
        self.baby = min(options, key=lambda m: (cost(m), m))
        m = self.baby
        b_all, g_all = shift % m, shift - shift % m
        # inner[q][g] -> [(p, b, mask plaintext)]
        self.inner: list[dict[int, list]] = [defaultdict(list) for _ in range(n_out)]
        groups: dict[tuple[int, int, int, int], list[int]] = defaultdict(list)
        for e in range(len(shift)):
            groups[(int(dst_ct[e]), int(g_all[e]), int(src_ct[e]), int(b_all[e]))].append(
                int(dst[e]))
        prime = ctx.backend.prime(level)
        babies: list[set[int]] = [set() for _ in range(n_in)]
        for (q, g, p, b), slots_d in sorted(groups.items()):
            mask = None
            if ctx.values_needed:
                mask = np.zeros(slots)
                mask[(np.asarray(slots_d) + g) % slots] = 1.0
            self.inner[q][g].append((p, b, ctx.encode(mask, level, prime)))
            babies[p].add(b)
            self.expected_ops["multiply_plain"] += 1
        self.chains = [plan_rotation_chain(ctx, self, sorted(bs)) for bs in babies]
        # giant steps by Horner's rule: one key (M) plus one for each ciphertext's first giant
        self.step(ctx, m)
        for inner in self.inner:
            if min(inner):
                self.step(ctx, min(inner))
        self.out_level, self.out_scale = level - 1, scale * prime / prime  # SEAL's order

    def describe(self) -> str:
        return f"{super().describe()} (baby modulus {self.baby})"

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        rotated = [run_rotation_chain(be, ct, chain) for ct, chain in zip(cts, self.chains,
                                                                           strict=True)]
        m = self.baby
        outs = []
        for inner in self.inner:
            g0, g1 = min(inner), max(inner)
            parts = [masked_sum(be, rotated, inner.get(g, [])) for g in range(g0, g1 + 1, m)]
            acc = horner(be, parts, m)
            if g0:
                acc = be.rotate(acc, g0)
            outs.append(acc)
        return outs
