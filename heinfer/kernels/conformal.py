"""The server's part of a collapsed conformal network: from u = [M; R] x (a dense layer before
it) to z = M x and q = ||R x||^2, in two ciphertexts, at depth 2 whatever the network's depth.

q is the square of u, masked to R's rows and summed by a rotate-and-sum (a one-row dense layer
that keeps its product unrescaled, so the depth stays 2). z is u itself: the client reads M's
rows from it, adds c0 ||x|| to q, divides and adds the bias.
"""

from __future__ import annotations

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.kernels.base import BuildContext, Kernel
from heinfer.kernels.dense import DiagonalDense
from heinfer.kernels.poly import Square
from heinfer.layout import SlotLayout


class ConformalHead(Kernel):
    name = "conformal_head"

    def __init__(self, ctx: BuildContext, n_logits: int, in_layout, level: int, scale: float,
                 headroom_bits: int = 10):
        super().__init__(ctx, in_layout, level, scale)
        self.square = Square(ctx, in_layout, level, scale)
        ones = np.zeros((1, in_layout.size))
        ones[0, n_logits:] = 1.0
        self.sum = DiagonalDense(ctx, ones, None, in_layout, self.square.out_level,
                                 self.square.out_scale, rescale=False,
                                 headroom_bits=headroom_bits)
        self.steps_used = self.sum.steps_used
        _, slot_idx = in_layout.positions()
        q_slot = int(self.sum.out_layout.positions()[1][0])
        self.out_layout = SlotLayout(tuple(int(s) for s in slot_idx[:n_logits]) + (q_slot,),
                                     in_layout.slots, (0,) * n_logits + (1,))
        self.out_level, self.out_scale = self.sum.out_level, self.sum.out_scale

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        u = cts[0]
        q = self.sum.run(be, self.square.run(be, [u]))[0]
        return [u, q]
