"""Multi-channel 2D convolution (stride, padding) by rotations and plaintext masks.

Input and output are grid layouts with the same channel block size. Output (co, i, j) is written
where input position (stride*i, stride*j) of block `co % k_out` sits, so the output stays in place
with wider strides and the next convolution, pooling or dense layer reads it directly.

For output ciphertext go, input block bi (channel ci) and output block bo (channel co), the value
needed at an output slot t is the input at t + (bi - bo)*block + tap offset. Grouping by the block
difference r = bi - bo:

    out_go = sum_r rot( sum_gi sum_tap rot(x_gi, tap) * mask[go, gi, r, tap], r*block )

Baby steps are the column taps (dj) of each input ciphertext, shared by every output and chained
so they need two keys. Giant steps are the kernel rows (di, Horner's rule with the row-stride key)
and then the block shifts r (Horner's rule with the block key), both on rescaled inner sums, so
they run one prime lower: about kw + kh rotations per output ciphertext instead of kh*kw.
A replicated input (every block holding the channel) makes r = 0 only.
Masks are zero wherever the window leaves the image (zero padding) or the slot is junk.
"""

from __future__ import annotations

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.kernels.base import BuildContext, Kernel, plan_rotation_chain, run_rotation_chain
from heinfer.layout import GridLayout


class RotationConv2d(Kernel):
    name = "conv2d"

    def __init__(self, ctx: BuildContext, weight: np.ndarray, bias: np.ndarray | None,
                 stride: int, padding: int, in_layout: GridLayout, level: int, scale: float,
                 out_channels_per_ct: int | None = None, scale_down_bits: int = 0):
        super().__init__(ctx, in_layout, level, scale)
        if not isinstance(in_layout, GridLayout):
            raise LayoutError(f"conv2d needs a grid layout, got {in_layout}")
        self.needs_levels(ctx, 1)
        be, slots = ctx.backend, ctx.slots
        co_n, ci_n, kh, kw = weight.shape
        c, h, w = in_layout.shape
        if ci_n != c:
            raise LayoutError(f"conv2d weight expects {ci_n} input channels, layout has {c}")
        s, p = stride, padding
        ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        if s * (ho - 1) > h - 1 or s * (wo - 1) > w - 1:
            raise LayoutError("padding larger than the kernel needs is not supported in place")
        lay = in_layout
        k_in = lay.channels_per_ct
        n_blocks_in = k_in * lay.replicas
        k_out = out_channels_per_ct or min(co_n, max(n_blocks_in, k_in))
        self.out_layout = GridLayout((co_n, ho, wo), slots, k_out, lay.block,
                                     lay.row_stride * s, lay.col_stride * s, lay.offset)
        self.block = lay.block
        taps = [(di, dj) for di in range(kh) for dj in range(kw)]
        ii, jj = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        # masks[go][(gi, r)] -> array (taps, slots)
        masks: list[dict[tuple[int, int], np.ndarray]] = [dict() for _ in range(
            self.out_layout.n_ct)]
        for co in range(co_n):
            go, bo = divmod(co, k_out)
            out_slots = (lay.offset + lay.block * bo + self.out_layout.row_stride * ii
                         + self.out_layout.col_stride * jj)
            for ci in range(ci_n):
                gi, cb = divmod(ci, k_in)
                # the block holding ci nearest to bo (replicas repeat every k_in blocks)
                rep_blocks = (lay.replica_stride // lay.block
                              if lay.replica_stride % lay.block == 0 else 0)
                cands = [cb + rep_blocks * rep for rep in range(lay.replicas if rep_blocks else 1)]
                bi = min(cands, key=lambda b: (abs(b - bo), b))
                r = bi - bo
                m = masks[go].setdefault((gi, r), np.zeros((len(taps), slots)))
                for t, (di, dj) in enumerate(taps):
                    wv = weight[co, ci, di, dj]
                    if wv == 0:
                        continue
                    inside = ((s * ii + di - p >= 0) & (s * ii + di - p < h)
                              & (s * jj + dj - p >= 0) & (s * jj + dj - p < w))
                    m[t][out_slots[inside]] = wv
        # weights at the scale the rescale drops (exact), optionally 2^k lower to shrink the
        # running scale for a final layer without rescale (see DiagonalDense)
        prime = be.prime(level) / 2.0**scale_down_bits
        R = lay.row_stride
        # plaintexts[go][r][di] -> [(gi, dj, pt)], masks pre-rotated for both giant steps
        self.plaintexts: list[dict[int, dict[int, list]]] = []
        used_dj: set[int] = set()
        r_values: set[int] = set()
        for go in range(self.out_layout.n_ct):
            by_r: dict[int, dict[int, list]] = {}
            for (gi, r), m in masks[go].items():
                for t, (di, dj) in enumerate(taps):
                    if not m[t].any():
                        continue
                    pt = ctx.encode(np.roll(m[t], r * lay.block + di * R), level, prime)
                    by_r.setdefault(r, {}).setdefault(di, []).append((gi, dj, pt))
                    used_dj.add(dj)
                    r_values.add(r)
                    self.expected_ops["multiply_plain"] += 1
            self.plaintexts.append(by_r)
        if not r_values:
            raise LayoutError("conv2d with all-zero weights")
        self.r_min, self.r_max = min(r_values), max(r_values)
        self.kh, self.row_stride = kh, R
        # baby offset of column tap dj, with the constant -p*(R + S) folded in
        self.baby_off = {dj: (dj - p) * lay.col_stride - p * R for dj in used_dj}
        self.chain = plan_rotation_chain(ctx, self, list(self.baby_off.values()))
        if kh > 1:
            self.step(ctx, R)
        if self.r_max > self.r_min:
            self.step(ctx, lay.block)
        if self.r_min:
            self.step(ctx, self.r_min * lay.block)
        self.out_level, self.out_scale = level - 1, scale / 2.0**scale_down_bits
        self.bias = None
        if bias is not None and np.any(bias):
            ct_idx, slot_idx = self.out_layout.positions()
            vals = np.repeat(bias, ho * wo)
            self.bias = []
            for go in range(self.out_layout.n_ct):
                v = np.zeros(slots)
                sel = ct_idx == go
                v[slot_idx[sel]] = vals[sel]
                self.bias.append(ctx.encode(v, self.out_level, self.out_scale))

    @staticmethod
    def _horner(be: Backend, parts: list, step: int):
        """sum_k rot(parts[k], k*step), parts[k] possibly None (zero)."""
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

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        rotated = [run_rotation_chain(be, ct, self.chain) for ct in cts]
        outs = []
        for go, by_r in enumerate(self.plaintexts):
            per_r = []
            for r in range(self.r_min, self.r_max + 1):
                per_di = []
                for di in range(self.kh):
                    inner = None
                    for gi, dj, pt in by_r.get(r, {}).get(di, []):
                        prod = be.multiply_plain(rotated[gi][self.baby_off[dj]], pt)
                        if inner is None:
                            inner = prod
                        else:
                            be.add_inplace(inner, prod)
                    if inner is not None:
                        be.rescale_inplace(inner)
                    per_di.append(inner)
                per_r.append(self._horner(be, per_di, self.row_stride))
            acc = self._horner(be, per_r, self.block)
            if self.r_min:
                acc = be.rotate(acc, self.r_min * self.block)
            if self.bias is not None:
                be.add_plain_inplace(acc, self.bias[go])
            outs.append(acc)
        return outs
