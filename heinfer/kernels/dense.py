"""Dense layer by the diagonal method with baby-step giant-step rotations.

The input may sit in any layout (`flatten` is free: a grid layout's positions in C order are the
flattened vector's). With m outputs and a row period m' >= m, output i collects at slots
t = T0 + i + k*m' the products W[i, j] * x[t + d] for d in [0, m'), one rotation per d:

    y = sum_d diag_d * rot(x, d),   out[i] = sum_k y[T0 + i + k*m']  (rotate-and-sum, stride m')

The d rotations are split into baby steps b < B (rotations of the input, one key for all: each
is a rotation by 1 of the previous) and giant steps B*g applied by Horner's rule to rescaled
inner sums (so they run on one prime less, and all with the key for B). Pre-rotating each
diagonal by -B*g makes the giant step exact.

A layer whose output leaves the server (`masked=True`, the plan's last linear layer) uses no
rotate-and-sum: with a row period m' >= span + m - 1 every product of row i lands on its output
slot directly, so the diagonals are zero outside the m output slots and the output ciphertext
holds the answer and zeros (plus noise): the output mask is folded into the layer's plaintexts
and costs no level, at the price of more diagonals (docs/SERVICE.md, "Threat model").

The network's last linear layer may skip its rescale (`rescale=False`): its weights are encoded
at a small scale that leaves `headroom_bits` for the outputs in the primes that are left, so the
whole modulus chain needs one prime less and every operation before it gets cheaper.
"""

from __future__ import annotations

import math

import numpy as np

from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError
from heinfer.kernels.base import (
    BuildContext,
    Kernel,
    next_pow2,
    plan_rotation_chain,
    rotate_and_sum,
    rotate_and_sum_steps,
    run_rotation_chain,
)
from heinfer.layout import SlotLayout, VectorLayout


def unroll_slots(slot_idx: np.ndarray, slots: int) -> np.ndarray:
    """Slots as integers on a line, cut at the largest cyclic gap (inputs may wrap around)."""
    s = np.unique(slot_idx % slots)
    gaps = np.diff(np.concatenate([s, [s[0] + slots]]))
    cut = int(np.argmax(gaps))  # the largest gap follows s[cut]
    start = s[(cut + 1) % len(s)]
    return (slot_idx - start) % slots + start


# Relative costs used to choose how many input replicas to use (rotation ~ 20 plaintext multiplies
# at n=8192); the compiler's calibrated cost model refines this later.
ROTATE_COST, MULTIPLY_PLAIN_COST = 20.0, 1.0
# CKKS encoding error per slot is about sqrt(n)/scale: 2^20 keeps it near 1e-4 at n=8192.
MIN_WEIGHT_SCALE_BITS = 20


def _period_and_groups(span: int, rows: int, room: int,
                       cyclic: bool = False) -> tuple[int, int] | None:
    """Row period >= rows whose padded group count fits `room` slots: the smallest one, or the
    next power of two when it costs at most half again as much, because power-of-two periods
    make the rotate-and-sum steps (and so the Galois keys) common to every layer."""
    if cyclic and span > room // 2 and room & (room - 1) == 0:
        # inputs spread over (nearly) every slot: a power-of-two period summed cyclically over
        # all room/period groups gathers every product (the diagonal index fixes the row)
        period = next_pow2(rows)
        return (period, room // period) if period <= room else None
    period = max(1, rows)
    while period <= room:
        groups = next_pow2((span + period - 2) // period + 1)
        if groups * period <= room:
            break
        period += 1
    else:
        return None
    p2 = next_pow2(period)
    if p2 <= 1.5 * period:
        g2 = next_pow2((span + p2 - 2) // p2 + 1)
        if g2 * p2 <= room:
            return p2, g2
    return period, groups


def _sparse_baby(present: np.ndarray) -> int:
    """The power-of-two baby step that needs the fewest rotations for the present diagonals:
    one per distinct nonzero d mod B per input ciphertext, and ceil(period / B) - 1 giant
    steps (Horner with one key rotates once per giant index, used or not)."""
    n_in, period = present.shape
    best = None
    for k in range(max(1, period).bit_length() + 1):
        b = 1 << k
        rots = sum(len(set((np.nonzero(row)[0] % b).tolist()) - {0}) for row in present)
        rots += math.ceil(period / b) - 1
        if best is None or rots < best[0]:
            best = (rots, b)
    return best[1] if best else 1


class DiagonalDense(Kernel):
    """With R copies of the input in the ciphertext (a replicated layout), the m outputs are split
    into R row groups, one per copy, all sharing the same diagonals and rotations: about R times
    fewer plaintext multiplies and baby/giant steps. The output then sits at explicit slots."""

    name = "dense"

    def __init__(self, ctx: BuildContext, weight: np.ndarray, bias: np.ndarray | None,
                 in_layout, level: int, scale: float, baby: int | None = None,
                 replicas: int | None = None, rescale: bool = True, headroom_bits: int = 6,
                 scale_down_bits: int = 0, masked: bool = False, room_below: int = 0):
        super().__init__(ctx, in_layout, level, scale)
        be, slots = ctx.backend, ctx.slots
        self.masked = masked
        self.rescale = rescale
        if rescale:
            self.needs_levels(ctx, 1)
            weight_scale = be.prime(level) / 2.0**scale_down_bits
        else:
            # room_below: levels an output mask drops after this layer (its product must fit
            # the primes left then)
            bits_left = sum(be.params.coeff_mod_bits[: level + 1 - room_below]) - 1
            weight_bits = bits_left - np.log2(scale) - headroom_bits
            if weight_bits < MIN_WEIGHT_SCALE_BITS:
                raise LayoutError(
                    f"dense without rescale at level {level}: only 2^{weight_bits:.0f} left for "
                    f"the weights' scale (want >= 2^{MIN_WEIGHT_SCALE_BITS}: CKKS encoding error "
                    "is about sqrt(n)/scale); lower the incoming scale (scale_down_bits on an "
                    "earlier layer), give the first prime more bits, or let the layer rescale")
            weight_scale = float(2.0 ** int(weight_bits))
        m, n = weight.shape
        ct_idx, slot_idx = in_layout.positions()
        if len(slot_idx) != n:
            raise LayoutError(f"dense layer takes {n} inputs, layout {in_layout} holds "
                              f"{len(slot_idx)}")
        u = unroll_slots(slot_idx, slots)
        span = int(u.max() - u.min()) + 1
        shifts_all = in_layout.replica_shifts()
        best = None
        if masked:
            # one copy of the input, every product on its output slot: no partial sums
            if span + m - 1 > slots:
                raise LayoutError(f"masked dense {n}->{m}: inputs span {span} of {slots} slots, "
                                  "no room for an output window without a rotate-and-sum")
            best, shifts_all = (0.0, [0], span + m - 1, 1), []
        for r in range(1, len(shifts_all) + 1):
            if replicas is not None and r != replicas:
                continue
            shifts = shifts_all[:r]
            room = min([b - a for a, b in zip(shifts, shifts[1:] + [slots], strict=True)])
            found = _period_and_groups(span, math.ceil(m / r), room, cyclic=room == slots)
            if found is None:
                continue
            period, groups = found
            cost = (MULTIPLY_PLAIN_COST * period * in_layout.n_ct
                    + ROTATE_COST * (2 * math.isqrt(period) + math.log2(groups)))
            if best is None or cost < best[0]:
                best = (cost, shifts, period, groups)
        if best is None:
            raise LayoutError(f"dense {n}->{m} does not fit {slots} slots from {in_layout}")
        _, shifts, period, groups = best
        self.period, self.groups, self.replicas = period, groups, len(shifts)
        rows_per = math.ceil(m / len(shifts))
        # masked: the outputs sit just below the inputs, so d = u - t0 - i is in [0, period)
        t0 = int(u.min()) - (m - 1 if masked else period - 1)
        rows = np.arange(m)
        local = (rows % rows_per)[:, None]
        delta = np.asarray(shifts)[rows // rows_per][:, None]
        n_in = in_layout.n_ct
        if ctx.values_needed:
            d = (u[None, :] - t0 - local) % period            # diagonal index of W[i, j]
            t = (u[None, :] + delta - d) % slots              # slot collecting W[i, j]
            diags = np.zeros((n_in, period, slots))
            diags[np.broadcast_to(ct_idx, (m, n)), d, t] = weight
            present = diags.any(-1)
        else:
            # data-free: which diagonals some input meets (every weight taken as nonzero),
            # without the (m, n) index arrays or the diagonals themselves
            present = np.zeros((n_in, period), dtype=bool)
            for c in range(n_in):
                res = np.unique((u[ct_idx == c] - t0) % period)
                if rows_per >= period:
                    present[c] = len(res) > 0
                else:
                    present[c, (res[:, None] - np.arange(rows_per)[None, :]) % period] = True
        # a power-of-two baby step (the giant step's key) is often a key some layer has already;
        # a masked layer's diagonals are sparse (span + m of them, few present): it picks the
        # split with the fewest rotations for the diagonals it has (a stored `baby` was chosen
        # for the unmasked period)
        self.baby = (_sparse_baby(present) if masked else baby) or max(
            1, 1 << round(math.log2(max(1.0, math.sqrt(period)))))
        self.giant = math.ceil(period / self.baby)
        # plaintexts[giant][(ct, b)]: diagonal b + B*giant of input ct, pre-rotated by -B*giant
        self.plaintexts: list[dict[tuple[int, int], object]] = []
        used_babies: set[int] = set()
        for gg in range(self.giant):
            row: dict[tuple[int, int], object] = {}
            for c in range(n_in):
                for b in range(self.baby):
                    dd = b + self.baby * gg
                    if dd >= period or not present[c, dd]:
                        continue
                    vals = np.roll(diags[c, dd], self.baby * gg) if ctx.values_needed else None
                    pt = ctx.encode(vals, level, weight_scale)
                    used_babies.add(b)  # the same rotations with or without the values
                    if ctx.is_zero(pt):
                        # weights below the encoding's precision (a masked layer's diagonal
                        # may hold one tiny weight): nothing to add, and SEAL refuses it
                        continue
                    row[(c, b)] = pt
                    self.expected_ops["multiply_plain"] += 1
            self.plaintexts.append(row)
        self.chain = plan_rotation_chain(ctx, self, sorted(used_babies))
        if self.giant > 1:
            self.step(ctx, self.baby)
        rotate_and_sum_steps(ctx, self, period, self.groups)
        self.out_level = level - 1 if rescale else level
        # in SEAL's own order (multiply, then divide by the prime): its scale check is exact
        self.out_scale = (scale * weight_scale / be.prime(level) if rescale
                          else scale * weight_scale)
        out_slots = (t0 + delta[:, 0] + local[:, 0]) % slots
        if self.replicas == 1 and np.all(np.diff(out_slots) == 1):
            self.out_layout = VectorLayout(m, slots, offset=int(out_slots[0]))
        else:
            self.out_layout = SlotLayout(tuple(int(x) for x in out_slots), slots)
        self.bias = None
        if bias is not None and np.any(bias):
            v = np.zeros(slots)
            v[out_slots] = bias
            self.bias = ctx.encode(v, self.out_level, self.out_scale)

    def describe(self) -> str:
        return (f"{super().describe()} (period {self.period}, {self.replicas} replica(s), "
                f"baby {self.baby} x giant {self.giant}, {self.groups} groups)")

    def run(self, be: Backend, cts: list[Ciphertext]) -> list[Ciphertext]:
        babies = [run_rotation_chain(be, ct, self.chain) for ct in cts]
        acc = None
        for gg in reversed(range(self.giant)):
            inner = None
            for (c, b), pt in self.plaintexts[gg].items():
                prod = be.multiply_plain(babies[c][b], pt)
                if inner is None:
                    inner = prod
                else:
                    be.add_inplace(inner, prod)
            if inner is not None and self.rescale:
                be.rescale_inplace(inner)
            if acc is None:
                acc = inner
            else:
                acc = be.rotate(acc, self.baby)
                if inner is not None:
                    be.add_inplace(acc, inner)
        if acc is None:
            raise LayoutError("dense layer whose weights are all zero at its weight scale")
        acc = rotate_and_sum(be, acc, self.period, self.groups)
        if self.bias is not None:
            be.add_plain_inplace(acc, self.bias)
        return [acc]
