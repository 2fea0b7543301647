"""Throughput mode: a batch of images in the slots, one ciphertext per tensor element.

Every linear layer (convolution or dense) is a matrix over ciphertexts: output j is the sum of
w[j, i] * x_i over the non-zero weights, each weight a scalar plaintext encoded on the fly (SEAL
encodes a scalar in microseconds; pre-encoding millions of them would be slower and huge), then
one rescale per output. No rotations and no Galois keys. Pooling is a sum of ciphertexts.
"""

from __future__ import annotations

import numpy as np

from heinfer import reference
from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.kernels.base import BuildContext, Kernel
from heinfer.layout import BatchLayout


def conv_matrix(weight: np.ndarray, stride: int, padding: int,
                in_shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The convolution as a dense (outputs x inputs) matrix, column by column."""
    n_in = int(np.prod(in_shape))
    cols = []
    for i in range(n_in):
        e = np.zeros(n_in)
        e[i] = 1.0
        cols.append(reference.conv2d(e.reshape(in_shape), weight, None, stride, padding))
    out_shape = cols[0].shape
    return np.stack([c.reshape(-1) for c in cols], axis=1), out_shape


class BatchLinear(Kernel):
    name = "batch_linear"

    def __init__(self, ctx: BuildContext, matrix: np.ndarray, bias: np.ndarray | None,
                 out_shape: tuple[int, ...], in_layout: BatchLayout, level: int, scale: float,
                 rescale: bool = True, headroom_bits: int = 6, scale_down_bits: int = 0):
        super().__init__(ctx, in_layout, level, scale)
        if not isinstance(in_layout, BatchLayout) or matrix.shape[1] != in_layout.n_ct:
            raise LayoutError(f"batch linear layer {matrix.shape} does not take {in_layout}")
        be = ctx.backend
        self.rescale = rescale
        if rescale:
            self.needs_levels(ctx, 1)
            self.weight_scale = be.prime(level) / 2.0**scale_down_bits
        else:
            bits_left = sum(be.params.coeff_mod_bits[: level + 1]) - 1
            self.weight_scale = float(2.0 ** int(bits_left - np.log2(scale) - headroom_bits))
        self.level = level
        # per output: (input indices, weights) of the non-zero entries
        self.rows = [(np.nonzero(r)[0], r[np.nonzero(r)[0]]) for r in matrix]
        self.expected_ops["multiply_plain"] = sum(len(i) for i, _ in self.rows)
        self.out_level = level - 1 if rescale else level
        self.out_scale = (scale * self.weight_scale / be.prime(level) if rescale
                          else scale * self.weight_scale)
        self.out_layout = BatchLayout(tuple(out_shape), in_layout.slots)
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float64)

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        outs = []
        for j, (idx, w) in enumerate(self.rows):
            acc = None
            for i, wi in zip(idx, w, strict=True):
                prod = be.multiply_plain(cts[i], be.encode_scalar(wi, self.level,
                                                                  self.weight_scale))
                if acc is None:
                    acc = prod
                else:
                    be.add_inplace(acc, prod)
            if acc is None:
                raise LayoutError(f"output {j} of a batch linear layer has no weights")
            if self.rescale:
                be.rescale_inplace(acc)
            if self.bias is not None and self.bias[j]:
                be.add_plain_inplace(acc, be.encode_scalar(self.bias[j], self.out_level,
                                                           be.scale_of(acc)))
            outs.append(acc)
        return outs


class BatchSumPool(Kernel):
    name = "batch_sumpool"

    def __init__(self, ctx: BuildContext, kernel: int, stride: int, in_layout: BatchLayout,
                 level: int, scale: float):
        super().__init__(ctx, in_layout, level, scale)
        c, h, w = in_layout.shape
        ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        idx = np.arange(c * h * w).reshape(c, h, w)
        self.groups = [[int(idx[ch, stride * i + di, stride * j + dj])
                        for di in range(kernel) for dj in range(kernel)]
                       for ch in range(c) for i in range(ho) for j in range(wo)]
        self.out_layout = BatchLayout((c, ho, wo), in_layout.slots)

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        outs = []
        for g in self.groups:
            acc = be.copy(cts[g[0]])
            for i in g[1:]:
                be.add_inplace(acc, cts[i])
            outs.append(acc)
        return outs
