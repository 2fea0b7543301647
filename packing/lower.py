"""Lower a model (project format) to an executable plan: HE-friendly folding, parameters, layouts.

Folding rules (each exact, so the plan computes the model's function):
- average pooling becomes a sum of rotated copies; its 1/k^2 goes into the previous linear layer
  (weights and bias), or into the next one when pooling comes first;
- a degree-2 activation a*x^2 + b*x + c becomes a*((x + b/2a)^2 + c'): the shift b/2a goes into
  the previous linear layer's bias, the square costs one level, c' is a free plaintext add, and
  the factor a goes into the next linear layer's weights (or the output scale at the end);
- when nothing linear precedes it, the activation runs as a generic depth-2 polynomial.
"""

from __future__ import annotations

import math

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.kernels.poly import fold_square
from heinfer.layout import GridLayout, Im2colLayout, Layout, VectorLayout
from heinfer.params import MAX_LOG_Q_128, CKKSParams
from heinfer.plan import Plan, PlanStep
from heinfer_packing.modelfile import Model

LINEAR_OPS = ("conv2d", "dense")


def fold_model(model: Model) -> tuple[list[PlanStep], float]:
    """Return the folded steps (before layout choice) and the output scale factor."""
    steps: list[PlanStep] = []
    pending = 1.0        # factor owed to the next linear layer's inputs
    last_linear: int | None = None
    copies = 1           # how many copies of last_linear's bias a later sum-pool adds up
    for layer in model.layers:
        if layer.op in LINEAR_OPS:
            w = np.array(layer.weight, dtype=np.float64) * pending
            b = None if layer.bias is None else np.array(layer.bias, dtype=np.float64)
            pending = 1.0
            steps.append(PlanStep(layer.op, dict(layer.attrs), w, b))
            last_linear, copies = len(steps) - 1, 1
        elif layer.op == "avgpool2d":
            k = layer.attrs["kernel"]
            factor = 1.0 / (k * k)
            if last_linear is not None:
                st = steps[last_linear]
                st.weight = st.weight * factor
                st.bias = None if st.bias is None else st.bias * factor
            else:
                pending *= factor
            steps.append(PlanStep("sumpool2d", {"kernel": k,
                                                "stride": layer.attrs.get("stride", k)}))
            copies *= k * k
        elif layer.op == "flatten":
            steps.append(PlanStep("flatten"))
        elif layer.op == "poly":
            coeffs = [float(c) * pending**i for i, c in enumerate(layer.attrs["coeffs"])]
            pending = 1.0
            folded = fold_square(coeffs)
            if folded is not None and last_linear is not None:
                a, shift, const = folded
                st = steps[last_linear]
                n_out = st.weight.shape[0]
                st.bias = (np.zeros(n_out) if st.bias is None else st.bias) + shift / copies
                steps.append(PlanStep("square", {"constant": const}))
                pending = a
            elif len(coeffs) <= 3:
                steps.append(PlanStep("poly2", {"coeffs": coeffs}))
            else:
                raise ModelFormatError(
                    f"layer {layer.name!r}: polynomial of degree {len(coeffs) - 1} is not "
                    "supported yet (degree <= 2)"
                )
            last_linear = None
        else:
            raise ModelFormatError(f"layer {layer.name!r}: op {layer.op!r} cannot be lowered")
    return steps, pending


def plan_depth(steps: list[PlanStep]) -> int:
    cost = {"conv2d": 1, "conv2d_im2col": 1, "dense": 1, "square": 1, "poly2": 2}
    return sum(cost.get(s.op, 0) for s in steps)


def choose_params(depth: int, scale_bits: int = 29, min_slots: int = 0) -> CKKSParams:
    """Smallest 128-bit ring whose chain holds `depth` rescales of `scale_bits` primes, with the
    outer primes (first data prime, special prime) as large as the budget allows."""
    for n, limit in sorted(MAX_LOG_Q_128.items()):
        if n < 4096 or n // 2 < min_slots:
            continue
        outer = min(60, (limit - scale_bits * depth) // 2)
        if outer >= scale_bits + 4:
            return CKKSParams(poly_modulus_degree=n,
                              coeff_mod_bits=[outer] + [scale_bits] * depth + [outer],
                              scale_bits=scale_bits)
    raise ModelFormatError(f"no 128-bit parameters hold depth {depth} at scale 2^{scale_bits}")


def input_layout_for(first: PlanStep, input_shape: tuple[int, ...], slots: int,
                     first_conv: str) -> tuple[Layout, PlanStep]:
    if first.op == "conv2d":
        co, ci, kh, kw = first.weight.shape
        stride, pad = first.attrs.get("stride", 1), first.attrs.get("padding", 0)
        if first_conv == "im2col":
            probe = Im2colLayout(tuple(input_shape), co, (kh, kw), stride, pad, slots, 1)
            tpc = 1 << int(math.log2(max(1, slots // probe.group)))
            # groups spread over all slots: the rotate-and-sum then replicates the result
            layout = Im2colLayout(tuple(input_shape), co, (kh, kw), stride, pad, slots, tpc,
                                  slots // tpc)
            return layout, PlanStep("conv2d_im2col", {}, first.weight, first.bias)
        c, h, w = input_shape
        block = h * w
        per_ct = max(1, min(c, slots // block))
        replicas = max(1, min(co // per_ct, slots // (per_ct * block))) if per_ct == c else 1
        return GridLayout(tuple(input_shape), slots, per_ct, block, w, 1, 0, replicas), first
    n = int(np.prod(input_shape))
    return VectorLayout(n, slots), first


def lower(model: Model, params: CKKSParams | None = None, first_conv: str = "im2col",
          output_div: float = 1.0) -> Plan:
    """Model -> Plan. `first_conv`: "im2col" (client arranges windows: larger upload, fastest)
    or "rotation" (input in one ciphertext: small upload, rotations on the server).
    `output_div` divides the last linear layer so logits fit the last prime's headroom."""
    steps, out_scale = fold_model(model)
    linear = [i for i, s in enumerate(steps) if s.op in LINEAR_OPS]
    if output_div != 1.0 and linear:
        last = steps[linear[-1]]
        if linear[-1] == len(steps) - 1 or all(s.op == "flatten" for s in steps[linear[-1] + 1:]):
            last.weight = last.weight / output_div
            last.bias = None if last.bias is None else last.bias / output_div
            out_scale *= output_div
    params = params or choose_params(plan_depth(steps))
    layout, first = input_layout_for(steps[0], model.input_shape, params.slots, first_conv)
    steps[0] = first
    if plan_depth(steps) > params.depth:
        from heinfer.errors import DepthExhaustedError

        raise DepthExhaustedError(
            f"model {model.name} needs depth {plan_depth(steps)}, {params.describe()} gives "
            f"{params.depth}; add data primes or use choose_params()"
        )
    return Plan(model.name, params, tuple(model.input_shape), layout, steps, out_scale,
                list(model.labels), {"first_conv": first_conv, **model.metadata})
