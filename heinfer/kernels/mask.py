"""Output mask for a last kernel that cannot fold it into its own plaintexts.

Dense and conformal layers fold the mask (no rotate-and-sum, docs/SERVICE.md "Threat model");
batch kernels have no slot that is not an answer. Any other last kernel (a model ending in a
convolution, a pool or an activation) gets this step: each output ciphertext times the 0/1
vector of its answer slots. With a level left it multiplies at the prime's scale and rescales
(one level); at level 0 it multiplies unrescaled at 2^20 or more when the chain has the room.
"""

from __future__ import annotations

import math

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import DepthExhaustedError
from heinfer.kernels.base import BuildContext, Kernel

# CKKS encoding error is about sqrt(n)/scale per slot: 2^20 keeps the mask's near 1e-4
MIN_MASK_SCALE_BITS = 20


def slot_masks(layout) -> list[np.ndarray]:
    """Per output ciphertext, 1.0 on the slots its layout lists, 0.0 elsewhere."""
    ct, slot = layout.positions()
    masks = [np.zeros(layout.slots) for _ in range(layout.n_ct)]
    for c, s in zip(ct, slot, strict=True):
        masks[int(c)][int(s)] = 1.0
    return masks


class OutputMask(Kernel):
    name = "output_mask"
    masks_output = True

    def __init__(self, ctx: BuildContext, in_layout, level: int, scale: float):
        super().__init__(ctx, in_layout, level, scale)
        be = ctx.backend
        self.rescale = level >= 1
        if self.rescale:
            mask_scale = float(be.prime(level))
        else:
            room = sum(be.params.coeff_mod_bits[: level + 1]) - 1 - math.log2(scale) - 6
            if room < MIN_MASK_SCALE_BITS:
                raise DepthExhaustedError(
                    f"the output mask needs one more level or 2^{MIN_MASK_SCALE_BITS} of room "
                    f"at level 0 (the output at scale 2^{math.log2(scale):.1f} leaves "
                    f"2^{room:.0f}); add a data prime ({be.params.describe()})")
            mask_scale = 2.0 ** int(room)
        values = slot_masks(in_layout) if ctx.values_needed else [None] * in_layout.n_ct
        self.masks = [ctx.encode(v, level, mask_scale) for v in values]
        self.expected_ops["multiply_plain"] = in_layout.n_ct
        self.out_level = level - 1 if self.rescale else level
        self.out_scale = (scale * mask_scale / be.prime(level) if self.rescale
                          else scale * mask_scale)

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        out = []
        for ct, pt in zip(cts, self.masks, strict=True):
            prod = be.multiply_plain(ct, pt)
            if self.rescale:
                be.rescale_inplace(prod)
            out.append(prod)
        return out
