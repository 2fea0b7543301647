"""The server's part of a collapsed conformal network: z = M x and q = ||R x||^2, in two
ciphertexts, at depth 2 whatever the network's depth.

z and R x come from two dense layers on the same input (z's large values never meet q's small
ones: squaring them together would let the mask's encoding error, about sqrt(n)/scale per slot,
swamp q). q squares R x, masks it to R's rows and sums by a rotate-and-sum: a one-row dense layer
that keeps its product unrescaled, so the depth stays 2. The client adds c0 ||x|| to q, divides
z by it and adds the bias.
"""

from __future__ import annotations

import math

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.kernels.base import BuildContext, Kernel
from heinfer.kernels.dense import MIN_WEIGHT_SCALE_BITS, DiagonalDense
from heinfer.kernels.poly import Square
from heinfer.layout import SlotLayout


class ConformalKernel(Kernel):
    name = "conformal"

    def __init__(self, ctx: BuildContext, weight: np.ndarray, n_logits: int, in_layout,
                 level: int, scale: float, headroom_bits: int = 10, masked: bool = False):
        super().__init__(ctx, in_layout, level, scale)
        be = ctx.backend
        M, R = weight[:n_logits], weight[n_logits:]
        # masked: z and q each hold their answer slots and zeros, nothing else
        self.z = DiagonalDense(ctx, M, None, in_layout, level, scale, masked=masked)
        # the square's scale must leave 2^20 for the mask under q's headroom: shave the R
        # layer's weights' scale if needed (the square doubles the saving)
        square_bits = 2 * math.log2(scale) - math.log2(be.prime(level - 1))
        bits_left = sum(be.params.coeff_mod_bits[:level - 1]) - 1
        excess = square_bits + headroom_bits + MIN_WEIGHT_SCALE_BITS - bits_left
        self.r = DiagonalDense(ctx, R, None, in_layout, level, scale,
                               scale_down_bits=max(0, math.ceil(excess / 2)))
        self.square = Square(ctx, self.r.out_layout, self.r.out_level, self.r.out_scale)
        self.sum = DiagonalDense(ctx, np.ones((1, R.shape[0])), None, self.r.out_layout,
                                 self.square.out_level, self.square.out_scale, rescale=False,
                                 headroom_bits=headroom_bits, masked=masked)
        self.steps_used = self.z.steps_used | self.r.steps_used | self.sum.steps_used
        _, z_slots = self.z.out_layout.positions()
        q_slot = int(self.sum.out_layout.positions()[1][0])
        self.out_layout = SlotLayout(tuple(int(s) for s in z_slots) + (q_slot,),
                                     in_layout.slots, (0,) * n_logits + (1,))
        self.out_level, self.out_scale = self.sum.out_level, self.sum.out_scale

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        z = self.z.run(be, cts)[0]
        q = self.sum.run(be, self.square.run(be, self.r.run(be, cts)))[0]
        return [z, q]
