"""First convolution on a client-arranged input (`Im2colLayout`): upload traded for speed.

The client lays out each tap's window, replicated for every output channel, so the server does
one plaintext multiply per input ciphertext, one rescale, and a rotate-and-sum over the taps that
share a ciphertext (log2(taps_per_ct) rotations). The output is a compact grid layout: channel
co in block co of size Ho*Wo. A layer wider than the slots splits its output channels in groups:
each output ciphertext multiplies the same uploaded windows by its own channels' weights.
"""

from __future__ import annotations

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.kernels.base import (
    BuildContext,
    Kernel,
    rotate_and_sum,
    rotate_and_sum_steps,
)
from heinfer.layout import GridLayout, Im2colLayout


class Im2colConv2d(Kernel):
    name = "conv2d_im2col"

    def __init__(self, ctx: BuildContext, weight: np.ndarray, bias: np.ndarray | None,
                 in_layout: Im2colLayout, level: int, scale: float, scale_down_bits: int = 0):
        super().__init__(ctx, in_layout, level, scale)
        if not isinstance(in_layout, Im2colLayout):
            raise LayoutError(f"conv2d_im2col needs an im2col layout, got {in_layout}")
        self.needs_levels(ctx, 1)
        lay, slots = in_layout, ctx.slots
        co_n, ci_n, kh, kw = weight.shape
        if (co_n, ci_n, kh, kw) != (lay.out_channels, lay.in_shape[0], *lay.kernel):
            raise LayoutError(f"weight {weight.shape} does not match {lay}")
        ho, wo = lay.out_hw
        P = ho * wo
        k = lay.out_per_ct
        prime = ctx.backend.prime(level) / 2.0**scale_down_bits  # see RotationConv2d
        # plaintexts[og][q]: weights of output group og for the taps of input ciphertext q
        self.plaintexts: list[list] = []
        for og in range(lay.out_groups):
            chans = np.arange(og * k, min(co_n, (og + 1) * k))
            row = []
            for q in range(lay.n_ct):
                v = None
                if ctx.values_needed:
                    v = np.zeros(slots)
                    for g in range(lay.taps_per_ct):
                        t = q * lay.taps_per_ct + g
                        if t >= lay.taps:
                            break
                        ci, di, dj = lay.tap(t)
                        start = g * lay.group_stride
                        v[start : start + len(chans) * P] = np.repeat(weight[chans, ci, di, dj], P)
                row.append(ctx.encode(v, level, prime))
                self.expected_ops["multiply_plain"] += 1
            self.plaintexts.append(row)
        self.group, self.count = lay.group_stride, lay.taps_per_ct
        rotate_and_sum_steps(ctx, self, self.group, self.count)
        # When the groups tile all slots, the cyclic rotate-and-sum leaves the full sum in every
        # group: the output comes replicated for free (the dense layer after uses the copies).
        replicas = (self.count if self.count * self.group == slots and lay.out_groups == 1
                    else 1)
        self.out_layout = GridLayout((co_n, ho, wo), slots, k, P, wo, 1, 0, replicas,
                                     self.group if replicas > 1 else 0)
        # in SEAL's own order (multiply, then divide by the prime): its scale check is exact
        self.out_level = level - 1
        self.out_scale = scale * prime / ctx.backend.prime(level)
        self.bias = None
        if bias is not None and np.any(bias):
            ct_idx, slot_idx = self.out_layout.positions()
            vals = np.repeat(bias, P)
            self.bias = []
            for og in range(lay.out_groups):
                v = np.zeros(slots)
                sel = ct_idx == og
                for shift in self.out_layout.replica_shifts():
                    v[slot_idx[sel] + shift] = vals[sel]
                self.bias.append(ctx.encode(v, self.out_level, self.out_scale))

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        if len(cts) != len(self.plaintexts[0]):
            raise LayoutError(f"im2col input needs {len(self.plaintexts[0])} ciphertexts, "
                              f"got {len(cts)}")
        outs = []
        for og, row in enumerate(self.plaintexts):
            acc = be.multiply_plain(cts[0], row[0])
            for ct, pt in zip(cts[1:], row[1:], strict=True):
                be.add_inplace(acc, be.multiply_plain(ct, pt))
            be.rescale_inplace(acc)
            acc = rotate_and_sum(be, acc, self.group, self.count)
            if self.bias is not None:
                be.add_plain_inplace(acc, self.bias[og])
            outs.append(acc)
        return outs
