"""Multi-channel 2D convolution (stride, padding) by rotations and plaintext masks.

Input and output are grid layouts with the same channel block size. Output (co, i, j) is written
where input position (stride*i, stride*j) of block `co % k_out` sits, so the output stays in place
with wider strides and the next convolution, pooling or dense layer reads it directly.

For output ciphertext go, input block bi (channel ci) and output block bo (channel co), the value
needed at an output slot t is the input at t + r*block + tap offset with r = bi - bo. When blocks
tile the slots, r is taken modulo the number of blocks (a rotation by nb*block is the identity),
so each input/output ciphertext pair has at most nb block diagonals instead of 2*nb - 1:

    out_go = sum_{r, tap} rot(x_gi, r*block + tap) * mask[go, gi, r, tap]

The rotations are split baby-step/giant-step. r = r0 + rb + b*rg: baby steps (rotations of each
input ciphertext, shared by every output) are rb*block plus the column taps, plus the row taps
when that is cheaper; giant steps (Horner's rule on rescaled inner sums, one Galois key each) are
the kernel rows (when not baby steps) and rg*b*block. Masks are pre-rotated by their giant
amount. `b` and where the rows go are chosen per layer by counting rotations and rescales, so a
layer with few diagonals keeps b = 1 and a wide one gets about sqrt(diagonals) baby steps.
A replicated input (every block holding the channel) makes r = 0 only.
Masks are zero wherever the window leaves the image (zero padding) or the slot is junk.
On a data-free backend (counts, keys, the compiler's report) no mask is built, so full-size
networks plan in little memory.
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

# rescale / rotation cost ratio used to place the row taps and size the baby steps (calibration
# at n=16384: 6.5 ms vs 51 ms at the top level; at n=8192 about the same ratio)
RESCALE_PER_ROTATION = 0.13


class RotationConv2d(Kernel):
    name = "conv2d"

    def __init__(self, ctx: BuildContext, weight: np.ndarray, bias: np.ndarray | None,
                 stride: int, padding: int, in_layout: GridLayout, level: int, scale: float,
                 out_channels_per_ct: int | None = None, scale_down_bits: int = 0,
                 baby: int | None = None, rows_in_baby: bool | None = None,
                 replicate_output: bool = True):
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
        # interleaved channels (a block smaller than one channel's grid: channel c sits at
        # column offset c, as a compacted HWC layout): the output keeps the interleave, so at
        # most col_stride*stride channels per ciphertext, no copies, no cyclic diagonals
        interleaved = lay.block < lay.row_stride * (h - 1) + lay.col_stride * (w - 1) + 1
        nb = slots // lay.block if slots % lay.block == 0 and not interleaved else 0
        # blocks that tile the slots make block diagonals cyclic: all outputs in one ciphertext
        # then cost no more diagonals than the input has blocks
        if interleaved:
            k_out = out_channels_per_ct or min(co_n, lay.col_stride * s // lay.block)
        else:
            k_out = out_channels_per_ct or (co_n if nb and co_n <= nb
                                            else min(co_n, max(n_blocks_in, k_in)))
        # When all outputs fit in half the slots or less, write them in every free copy too: the
        # same rotations and multiplies serve them (fuller masks), and the next convolution then
        # finds each input channel at a block diagonal r in [0, channels) instead of (-nb, nb).
        out_reps = 1
        if nb and co_n <= k_out and replicate_output and lay.offset == 0:
            while k_out * out_reps * 2 <= nb:
                out_reps *= 2
        self.out_layout = GridLayout((co_n, ho, wo), slots, k_out, lay.block,
                                     lay.row_stride * s, lay.col_stride * s, lay.offset, out_reps)
        self.block, self.kh, self.row_stride = lay.block, kh, lay.row_stride
        R, S = lay.row_stride, lay.col_stride

        # block diagonal r of every (output block, ci) pair, using the replica of ci that makes r
        # smallest (modulo nb when blocks tile the slots, else nearest)
        ob_i, ci_i = np.meshgrid(np.arange(co_n * out_reps), np.arange(ci_n), indexing="ij")
        co_i = ob_i % co_n
        go_i, bo_i = np.divmod(co_i, k_out)
        bo_i = bo_i + k_out * (ob_i // co_n)
        gi_i, cb_i = np.divmod(ci_i, k_in)
        rep_blocks = (lay.replica_stride // lay.block
                      if lay.replica_stride % lay.block == 0 else 0)
        reps = np.arange(lay.replicas if rep_blocks else 1)
        cand = cb_i[..., None] + rep_blocks * reps                 # (ob, ci, reps)
        if nb:
            dist = (cand - bo_i[..., None]) % nb
        else:
            dist = np.abs(cand - bo_i[..., None]) * 2 + (cand < bo_i[..., None])  # ties: lower
        r_i = np.take_along_axis(cand, dist.argmin(-1)[..., None], -1)[..., 0] - bo_i
        if nb:
            r_i %= nb
        nz = weight.reshape(co_n, ci_n, kh * kw)[co_i[:, 0]] != 0   # per output block
        if not nz.any():
            raise LayoutError("conv2d with all-zero weights")
        used_r = r_i[nz.any(-1)]
        self.r0 = int(used_r.min())
        rel = r_i - self.r0
        taps_used = np.nonzero(nz.any((0, 1)))[0]
        di_used, dj_used = np.unique(taps_used // kw), np.unique(taps_used % kw)
        rel_used = np.unique(rel[nz.any(-1)])
        n_in, n_out = lay.n_ct, self.out_layout.n_ct

        def cost(b: int, rows_baby: bool) -> float:
            babies = len({(int(x) % b) for x in rel_used}) * len(dj_used)
            giants = len({int(x) // b for x in rel_used})
            span = int(rel_used.max()) // b + 1
            if rows_baby:
                babies *= len(di_used)
                rots, rescales = span - 1, giants
            else:
                rots, rescales = span * (kh - 1) + span - 1, giants * len(di_used)
            return (n_in * (babies - 1) + n_out * rots
                    + RESCALE_PER_ROTATION * n_out * rescales)

        bs = [1 << i for i in range(next_pow2(int(rel_used.max()) + 1).bit_length())]
        options = [(cost(b, rb), b, rb) for b in (bs if baby is None else [baby])
                   for rb in ((False, True) if rows_in_baby is None else (rows_in_baby,))]
        _, self.baby, self.rows_in_baby = min(options)
        b = self.baby
        self.n_giant = int(rel_used.max()) // b + 1

        def baby_offset(rb: int, di: int, dj: int) -> int:
            row = (di - p) * R if self.rows_in_baby else -p * R
            return rb * lay.block + (dj - p) * S + row

        # weights at the scale the rescale drops (exact), optionally 2^k lower to shrink the
        # running scale for a final layer without rescale (see DiagonalDense)
        prime = be.prime(level) / 2.0**scale_down_bits
        # inner[go][(rg, di_giant)] -> [(gi, baby offset, plaintext)]
        self.inner: list[dict[tuple[int, int], list]] = [defaultdict(list) for _ in range(n_out)]
        baby_offsets: set[int] = set()
        ii, jj = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        base = self.out_layout.row_stride * ii + self.out_layout.col_stride * jj
        inside = {}
        for t in taps_used:
            di, dj = divmod(int(t), kw)
            inside[t] = base[(s * ii + di - p >= 0) & (s * ii + di - p < h)
                             & (s * jj + dj - p >= 0) & (s * jj + dj - p < w)]
        for go in range(n_out):
            sel = (go_i == go) & nz.any(-1)
            groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
            for ob, ci in zip(*np.nonzero(sel), strict=True):
                groups[(int(gi_i[ob, ci]), int(rel[ob, ci]))].append(
                    (int(co_i[ob, ci]), int(bo_i[ob, ci]), int(ci)))
            for (gi, r), pairs in sorted(groups.items()):
                rb, rg = r % b, r // b
                w_pairs = np.array([weight[co, ci].reshape(-1) for co, _, ci in pairs])
                for t in taps_used:
                    if not w_pairs[:, t].any():
                        continue
                    di, dj = divmod(int(t), kw)
                    m = None
                    if ctx.values_needed:
                        m = np.zeros(slots)
                        for (_, bo, _), v in zip(pairs, w_pairs[:, t], strict=True):
                            if v != 0:
                                m[lay.offset + lay.block * bo + inside[t]] = v
                        m = np.roll(m, (self.r0 + rg * b) * lay.block
                                    + (0 if self.rows_in_baby else di * R))
                    pt = ctx.encode(m, level, prime)
                    off = baby_offset(rb, di, dj)
                    baby_offsets.add(off)  # the same rotations with or without the values
                    if ctx.is_zero(pt):  # weights below the scale's resolution
                        continue
                    self.inner[go][(rg, 0 if self.rows_in_baby else di)].append((gi, off, pt))
                    self.expected_ops["multiply_plain"] += 1
        self.chain = plan_rotation_chain(ctx, self, sorted(baby_offsets))
        if kh > 1 and not self.rows_in_baby:
            self.step(ctx, R)
        if self.n_giant > 1:
            self.step(ctx, b * lay.block)
        if self.r0:
            self.step(ctx, self.r0 * lay.block)
        # in SEAL's own order (multiply, then divide by the prime): its scale check is exact
        self.out_level, self.out_scale = level - 1, scale * prime / be.prime(level)
        self.bias = None
        if bias is not None and np.any(bias):
            ct_idx, slot_idx = self.out_layout.positions()
            vals = np.repeat(bias, ho * wo)
            self.bias = []
            for go in range(n_out):
                v = np.zeros(slots)
                sel = ct_idx == go
                for shift in self.out_layout.replica_shifts():
                    v[slot_idx[sel] + shift] = vals[sel]
                self.bias.append(ctx.encode(v, self.out_level, self.out_scale))

    def describe(self) -> str:
        rows = "rows in baby steps" if self.rows_in_baby else "rows as giant steps"
        return f"{super().describe()} (baby {self.baby} block(s), {self.n_giant} giant, {rows})"

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        rotated = [run_rotation_chain(be, ct, self.chain) for ct in cts]
        rows = 1 if self.rows_in_baby else self.kh
        outs = []
        for go, inner in enumerate(self.inner):
            per_rg = []
            for rg in range(self.n_giant):
                per_di = [masked_sum(be, rotated, inner.get((rg, di), []))
                          for di in range(rows)]
                per_rg.append(horner(be, per_di, self.row_stride))
            acc = horner(be, per_rg, self.baby * self.block)
            if acc is None:
                raise LayoutError("conv2d output ciphertext with no contribution")
            if self.r0:
                acc = be.rotate(acc, self.r0 * self.block)
            if self.bias is not None:
                be.add_plain_inplace(acc, self.bias[go])
            outs.append(acc)
        return outs
