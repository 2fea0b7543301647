"""Average pooling on a grid layout, as a sum of rotated copies (no depth).

The 1/k^2 factor is not applied here (a plaintext multiply would cost a level): the plan builder
folds it into the neighbouring linear layer's weights. Output stays in place with strides
multiplied by the pooling stride.
"""

from __future__ import annotations

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.kernels.base import BuildContext, Kernel
from heinfer.layout import GridLayout


class SumPool2d(Kernel):
    name = "sumpool2d"

    def __init__(self, ctx: BuildContext, kernel: int, stride: int, in_layout: GridLayout,
                 level: int, scale: float):
        super().__init__(ctx, in_layout, level, scale)
        if not isinstance(in_layout, GridLayout):
            raise LayoutError(f"pooling needs a grid layout, got {in_layout}")
        c, h, w = in_layout.shape
        ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        self.kernel = kernel
        self.col, self.row = in_layout.col_stride, in_layout.row_stride
        if kernel > 1:
            self.step(ctx, self.col)
            self.step(ctx, self.row)
        lay = in_layout
        # replicas stay valid: pooled positions read only inside their own replica
        self.out_layout = GridLayout((c, ho, wo), lay.slots, lay.channels_per_ct, lay.block,
                                     lay.row_stride * stride, lay.col_stride * stride,
                                     lay.offset, lay.replicas, lay.replica_stride)

    def _sum_along(self, be: Backend, ct: Ciphertext, step: int) -> Ciphertext:
        acc, cur = be.copy(ct), ct
        for _ in range(self.kernel - 1):
            cur = be.rotate(cur, step)
            be.add_inplace(acc, cur)
        return acc

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        return [self._sum_along(be, self._sum_along(be, ct, self.col), self.row) for ct in cts]
