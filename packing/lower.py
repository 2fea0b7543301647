"""Lower a model (project format) to an executable plan: HE-friendly folding, parameters, layouts.

Folding rules (each exact, so the plan computes the model's function):
- average pooling becomes a sum of rotated copies; its 1/k^2 goes into the previous linear layer
  (weights and bias), or into the next one when pooling comes first;
- a degree-2 activation a*x^2 + b*x + c becomes a*((x + b/2a)^2 + c'): the shift b/2a goes into
  the previous linear layer's bias, the square costs one level, c' is a free plaintext add, and
  the factor a goes into the next linear layer's weights (or the output scale at the end);
- when nothing linear precedes it, the activation runs as a generic depth-2 polynomial;
- a polynomial of degree d > 2 runs as the generic `poly` step (`PolyEval`) at depth
  floor(log2 d) + 1, its output at the input's scale (docs/COMPILER.md).
"""

from __future__ import annotations

import math

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.kernels.poly import effective_coeffs, fold_square, poly_depth
from heinfer.layout import GridLayout, Im2colLayout, Layout, VectorLayout
from heinfer.params import MAX_LOG_Q_128, CKKSParams
from heinfer.plan import Plan, PlanStep
from heinfer_packing.modelfile import Model

LINEAR_OPS = ("conv2d", "dense")
MIN_SCALE_BITS = 20
FIRST_CONV = ("im2col", "rotation")


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
            reach = _input_reach(layer.attrs.get("range"), pending)
            pending = 1.0
            folded = fold_square(coeffs)
            if folded is not None and reach is not None and abs(folded[1]) > SHIFT_LIMIT * reach:
                # a nearly linear fit (tanh or sigmoid on a narrow range): a((x + s)^2 + c')
                # with |s| >> |x| squares values far larger than x and cancels them again,
                # losing CKKS precision; (a x + b) x + c costs one level more and keeps it
                folded = None
            if folded is not None and last_linear is not None:
                a, shift, const = folded
                st = steps[last_linear]
                n_out = st.weight.shape[0]
                st.bias = (np.zeros(n_out) if st.bias is None else st.bias) + shift / copies
                steps.append(PlanStep("square", {"constant": const}))
                pending = a
            elif len(coeffs) <= 3:
                steps.append(PlanStep("poly2", {"coeffs": coeffs}))
            elif len(effective_coeffs(coeffs)) < 2:
                raise ModelFormatError(
                    f"layer {layer.name!r}: constant polynomial {coeffs}: nothing to compute "
                    "on ciphertexts (fold the constant into the next layer's bias)")
            else:
                steps.append(PlanStep("poly", {"coeffs": coeffs}))
            last_linear = None
        else:
            raise ModelFormatError(f"layer {layer.name!r}: op {layer.op!r} cannot be lowered")
    return steps, pending


# last steps that fold the output mask into their own plaintexts (heinfer.kernels.mask)
MASK_FOLDING_OPS = ("dense", "conformal", "batch_linear", "batch_sumpool")
# "fold": into the last layer (no level); "level": an OutputMask step (one level)
OUTPUT_MASKS = ("fold", "level")
OUTPUT_MASK = "output_mask"  # plan metadata key


# The folded square a((x + s)^2 + c') is used while |s| <= SHIFT_LIMIT x the largest |x| the
# fitted activation saw (its "range"); beyond, its squares dwarf x (docs/COMPILER.md).
SHIFT_LIMIT = 4.0


def _input_reach(fit_range: list[float] | None, pending: float) -> float | None:
    """Largest |input| of a fitted polynomial in the units the ciphertext carries (the model's
    input divided by the factor still owed to it), or None when the range is unknown."""
    if not fit_range or not pending:
        return None
    return max(abs(float(v)) for v in fit_range) / abs(pending) or None


def plan_depth(steps: list[PlanStep]) -> int:
    cost = {"conv2d": 1, "conv2d_im2col": 1, "dense": 1, "square": 1, "poly2": 2,
            "compact": 1}
    return sum(poly_depth(s.attrs["coeffs"]) if s.op == "poly" else cost.get(s.op, 0)
               for s in steps if s.attrs.get("rescale", True) or s.op not in ("dense",))


def mask_depth(steps: list[PlanStep], output_mask: str = "fold") -> int:
    """Levels the output mask adds: none when the last step folds it, else one
    (`OutputMask`: only the answer slots leave the server). `output_mask="level"`: one level
    whatever the last step (cheaper than folding when the last layer's inputs are dense:
    folding costs a plaintext multiply per input slot, docs/COMPILER.md)."""
    last = [s.op for s in steps if s.op != "flatten"]
    if not last or last[-1] in ("batch_linear", "batch_sumpool"):
        return 0
    return 1 if output_mask == "level" or last[-1] not in MASK_FOLDING_OPS else 0


# Above about 52 bits SEAL's special prime made rotations markedly slower on this machine
# (bench: [48, 28 x 4, 58] vs [51, 29 x 4, 51]); key-switching noise falls as it grows.
MAX_SPECIAL_PRIME_BITS = 52


def choose_params(depth: int, scale_bits: int = 29, min_slots: int = 0,
                  out_bits: int | None = None, final_rescale: bool = True) -> CKKSParams:
    """Smallest 128-bit ring whose chain holds `depth` rescales of `scale_bits` primes.

    With `final_rescale` the first prime only needs the output's bits above the scale
    (`out_bits` = log2 of the largest output, with margin) and the special prime gets the rest
    of the budget: key-switching noise scales with (largest prime) / (special prime), and it
    dominates the error. Without (the last layer keeps its product unrescaled) the first prime
    must hold scale x weight scale x output, so the budget is split evenly."""
    out_bits = 5 if out_bits is None else max(1, out_bits)
    for n, limit in sorted(MAX_LOG_Q_128.items()):
        if n < 4096 or n // 2 < min_slots:
            continue
        budget = limit - scale_bits * depth
        if final_rescale:
            first = scale_bits + 1 + out_bits
            special = min(MAX_SPECIAL_PRIME_BITS, 60, budget - first)
        else:
            # the first prime holds scale x 2^20 (weights) x output; give the special prime
            # what is left when that leaves it larger, else split evenly
            first = min(60, scale_bits + 20 + out_bits + 1)
            special = min(60, budget - first)
            if special < first:
                first = special = min(60, budget // 2)
        if special >= first and first >= scale_bits + 4:
            return CKKSParams(poly_modulus_degree=n,
                              coeff_mod_bits=[first] + [scale_bits] * depth + [special],
                              scale_bits=scale_bits)
    raise ModelFormatError(f"no 128-bit parameters hold depth {depth} at scale 2^{scale_bits}")


def input_layout_for(first: PlanStep, input_shape: tuple[int, ...], slots: int,
                     first_conv: str) -> tuple[Layout, PlanStep]:
    if first.op == "conv2d":
        co, ci, kh, kw = first.weight.shape
        stride, pad = first.attrs.get("stride", 1), first.attrs.get("padding", 0)
        if first_conv == "im2col":
            _, h, w = input_shape
            channel = ((h + 2 * pad - kh) // stride + 1) * ((w + 2 * pad - kw) // stride + 1)
            per_ct = min(co, slots // channel)  # output channels per output ciphertext
            if per_ct < 1:
                raise ModelFormatError(f"one output channel of the first convolution "
                                       f"({channel} values) exceeds {slots} slots")
            group = per_ct * channel
            tpc = 1 << int(math.log2(max(1, slots // group)))
            # groups spread over all slots: the rotate-and-sum then replicates the result
            layout = Im2colLayout(tuple(input_shape), co, (kh, kw), stride, pad, slots, tpc,
                                  slots // tpc, per_ct)
            return layout, PlanStep("conv2d_im2col", dict(first.attrs), first.weight, first.bias)
        c, h, w = input_shape
        block = h * w
        per_ct = max(1, min(c, slots // block))
        replicas = max(1, min(co // per_ct, slots // (per_ct * block))) if per_ct == c else 1
        return GridLayout(tuple(input_shape), slots, per_ct, block, w, 1, 0, replicas), first
    n = int(np.prod(input_shape))
    return VectorLayout(n, slots), first


def lower(model: Model, params: CKKSParams | None = None, first_conv: str = "im2col",
          output_div: float = 1.0, final_rescale: bool | None = None,
          batch: bool = False, scale_bits: int | None = None,
          compact: bool | str | None = False, output_mask: str = "fold") -> Plan:
    """Model -> Plan. `first_conv`: "im2col" (client arranges windows: larger upload, fastest)
    or "rotation" (input in one ciphertext: small upload, rotations on the server).
    `output_div` divides the last linear layer so logits fit the last prime's headroom.
    `final_rescale`: False = the last dense layer skips its rescale (one prime less); None (the
    default) = skip it when this function also chooses the parameters.
    `batch`: throughput mode, one image per slot (`BatchLayout`): same parameters and scales,
    linear layers as scalar multiply-accumulates over ciphertexts, no rotations.
    `scale_bits`: the CKKS scale (and data prime size) when this function chooses the
    parameters; default the model's `metadata["scale_bits"]`, else 29. A deep model trades bits
    per level for a smaller ring (fmnist-alexnet: 24 bits, n=16384 instead of 32768).
    `compact`: after a pooling that leaves its map sparse (under half the slots used) and feeds
    a convolution, convert to a compact grid (`Compact`, one level). True: wherever that holds,
    channel blocks; "interleaved": the same with channels interleaved (HWC); None: the cheapest
    of no compaction and both forms (this machine's calibration when cached, else operation
    counts), the choice recorded in `metadata["compact"]`; False (default): never."""
    if first_conv not in FIRST_CONV:
        raise ModelFormatError(f"first_conv {first_conv!r}: choose one of {FIRST_CONV}")
    if compact not in (None, True, False, "interleaved"):
        raise ModelFormatError(f"compact {compact!r}: choose None (priced), True, "
                               "'interleaved' or False")
    if output_mask == "auto":
        return _cheapest_mask(model, dict(params=params, first_conv=first_conv,
                                          output_div=output_div, final_rescale=final_rescale,
                                          batch=batch, scale_bits=scale_bits, compact=compact))
    if output_mask not in OUTPUT_MASKS:
        raise ModelFormatError(f"output_mask {output_mask!r}: choose one of "
                               f"{OUTPUT_MASKS + ('auto',)}")
    opts = dict(params=params, first_conv=first_conv, output_div=output_div,
                final_rescale=final_rescale, batch=batch, scale_bits=scale_bits,
                output_mask=output_mask)
    if compact is None or compact is True or compact == "interleaved":
        plain = lower(model, **opts)
        points = [] if batch else compaction_points(plain)
        if not points:
            plain.metadata["compact"] = {"points": [], "why": "no sparse pooled map feeds a conv"}
            return plain
        if compact is not None:
            return _lower(model, **opts, compact_after=points,
                          interleaved=compact == "interleaved")
        candidates = {"no compaction": plain}
        for name, inter in (("compact, channel blocks", False),
                            ("compact, interleaved channels", True)):
            try:
                candidates[name] = _lower(model, **opts, compact_after=points,
                                          interleaved=inter)
            except ModelFormatError:  # e.g. the extra levels fit no 128-bit parameters
                continue
        return _cheapest(candidates, points)
    return _lower(model, **opts)


def compaction_points(plan: Plan) -> list[int]:
    """Indices (in the folded steps) of pools whose output uses under half its slots and feeds
    a convolution: where a compact layout would shrink the next layers' ciphertext count."""
    from heinfer.backends.symbolic import SymbolicBackend
    from heinfer.kernels.relayout import slot_use

    kernels = plan.build_kernels(SymbolicBackend(plan.params), mask_output=False)
    points = []
    for i, (st, k) in enumerate(zip(plan.steps, kernels, strict=True)):
        nxt = plan.steps[i + 1].op if i + 1 < len(plan.steps) else None
        if st.op == "sumpool2d" and nxt == "conv2d" and slot_use(k.out_layout) < 0.5:
            points.append(i)
    return points


def _price(plan: Plan, calibrated: bool) -> float:
    """This machine's predicted ms (calibrated), else weighted operation counts (below)."""
    from heinfer_packing.calibrate import load_or_calibrate
    from heinfer_packing.report import report

    if calibrated:
        return report(plan, load_or_calibrate(plan.params)).predicted_ms
    rep = report(plan)
    ring = plan.params.poly_modulus_degree / 8192
    total = 0.0
    for lr in rep.layers:
        for (op, level), count in lr.ops.items():
            primes = level + 1
            key_switch = op.removesuffix("_inplace") in ("rotate", "square", "multiply",
                                                          "relinearize")
            total += count * ring * (20 * primes**2 / 25 if key_switch else primes / 5)
    return total


def _cheapest_mask(model: Model, opts: dict) -> Plan:
    """output_mask="auto": the folded mask and the mask level, priced like compaction (the
    level is left out where the lowering refuses it); the choice in metadata["output_mask_
    choice"]."""
    from heinfer_packing.calibrate import calibration_path

    candidates = {"fold": lower(model, **{**opts, "output_mask": "fold"})}
    try:
        candidates["level"] = lower(model, **{**opts, "output_mask": "level"})
    except ModelFormatError as e:
        candidates["fold"].metadata["output_mask_choice"] = {"chosen": "fold",
                                                             "level_refused": str(e)}
        return candidates["fold"]
    calibrated = all(calibration_path(p.params).exists() for p in candidates.values())
    prices = {name: _price(plan, calibrated) for name, plan in candidates.items()}
    name = min(prices, key=prices.get)
    best = candidates[name]
    best.metadata["output_mask_choice"] = {"chosen": name, "prices": prices,
                                           "unit": "calibrated ms" if calibrated
                                           else "weighted op counts"}
    return best


def _cheapest(candidates: dict[str, Plan], points: list[int]) -> Plan:
    """The candidate this machine's calibration prices lowest. When some candidate's parameters
    are not calibrated: operation counts weighted by ring degree and primes (key switching
    grows with the square of the primes, the rest linearly; a rotation as 20 plaintext
    multiplies at n=8192 with 5 primes), so a deeper plan on a larger ring pays for it."""
    from heinfer_packing.calibrate import calibration_path

    calibrated = all(calibration_path(p.params).exists() for p in candidates.values())
    prices = {name: _price(plan, calibrated) for name, plan in candidates.items()}
    name = min(prices, key=prices.get)
    best = candidates[name]
    best.metadata["compact"] = {"points": points, "chosen": name, "prices": prices,
                                "unit": "calibrated ms" if calibrated else "weighted op counts"}
    return best


def _lower(model: Model, params: CKKSParams | None, first_conv: str, output_div: float,
           final_rescale: bool | None, batch: bool, scale_bits: int | None,
           compact_after: list[int] | None = None, interleaved: bool = False,
           output_mask: str = "fold") -> Plan:
    steps, out_scale = fold_model(model)
    for i in sorted(compact_after or [], reverse=True):
        steps.insert(i + 1, PlanStep("compact", {"interleaved": True} if interleaved else {}))
    linear = [i for i, s in enumerate(steps) if s.op in LINEAR_OPS]
    if output_div != 1.0 and linear:
        last = steps[linear[-1]]
        if linear[-1] == len(steps) - 1 or all(s.op == "flatten" for s in steps[linear[-1] + 1:]):
            last.weight = last.weight / output_div
            last.bias = None if last.bias is None else last.bias / output_div
            out_scale *= output_div
    if final_rescale is False or (final_rescale is None and params is None):
        # The last dense layer keeps its product unrescaled: one prime less in the whole chain
        # (every earlier operation gets cheaper); its weights use a smaller scale instead.
        if steps[-1].op == "dense":
            steps[-1].attrs["rescale"] = False
    max_out = (model.metadata.get("max_abs") or {}).get(model.layers[-1].name)
    out_bits = math.ceil(math.log2(max_out * 1.5 / output_div)) if max_out else None
    if scale_bits is None:
        scale_bits = int(model.metadata.get("scale_bits", 29))
    if not MIN_SCALE_BITS <= scale_bits <= 60:
        raise ModelFormatError(f"scale_bits {scale_bits}: choose {MIN_SCALE_BITS}..60 (CKKS "
                               "keeps about scale_bits - 10 bits of precision; SEAL primes are "
                               "at most 60 bits)")
    depth = plan_depth(steps) + mask_depth(steps, output_mask)
    params = params or choose_params(depth, scale_bits, out_bits=out_bits,
                                     final_rescale=steps[-1].attrs.get("rescale", True))
    layout, first = input_layout_for(steps[0], model.input_shape, params.slots, first_conv)
    steps[0] = first
    if depth > params.depth:
        from heinfer.errors import DepthExhaustedError

        raise DepthExhaustedError(
            f"model {model.name} needs depth {depth} (with "
            f"the output mask), {params.describe()} gives "
            f"{params.depth}; add data primes or use choose_params()"
        )
    plan = Plan(model.name, params, tuple(model.input_shape), layout, steps, out_scale,
                list(model.labels), {"first_conv": first_conv, **model.metadata})
    if output_mask == "level" and not batch:
        plan.metadata[OUTPUT_MASK] = "level"
        if steps[-1].op == "dense":
            # the OutputMask's rescale drops a prime after it: the unrescaled product must fit
            # the primes left below it
            steps[-1].attrs["room_below"] = 1
    if compact_after:
        plan.metadata["compact_after"] = list(compact_after)
    if steps[-1].op == "dense" and not steps[-1].attrs.get("rescale", True):
        _fit_final_scale(plan, model)
    if batch:
        _to_batch(plan)
    return plan


BATCH_OPS = {"conv2d": "batch_linear", "conv2d_im2col": "batch_linear",
             "dense": "batch_linear", "sumpool2d": "batch_sumpool"}


def _to_batch(plan: Plan) -> None:
    """Same steps (and so the same levels and scales), batch-in-slots kernels and layout."""
    from heinfer.layout import BatchLayout

    for st in plan.steps:
        st.op = BATCH_OPS.get(st.op, st.op)
    plan.input_layout = BatchLayout(tuple(plan.input_shape), plan.params.slots)
    plan.metadata["mode"] = "batch"


def _fit_final_scale(plan: Plan, model: Model) -> None:
    """A last dense layer without rescale multiplies by weights at scale 2^w in what is left of
    the chain: incoming scale + w + output bits must fit. Output bits come from the recorded
    max |logit| (with margin); when the incoming scale is too large for w >= 20, the linear layer
    before the last square encodes its weights 2^k lower (the square doubles the saving)."""
    from heinfer.backends.symbolic import SymbolicBackend
    from heinfer.kernels.dense import MIN_WEIGHT_SCALE_BITS

    steps, params = plan.steps, plan.params
    max_out = (model.metadata.get("max_abs") or {}).get(model.layers[-1].name)
    headroom = math.ceil(math.log2(max_out * 1.5)) + 1 if max_out else 6
    steps[-1].attrs["headroom_bits"] = headroom
    probe = Plan(plan.name, params, plan.input_shape, plan.input_layout, steps[:-1])
    before_last = probe.build_kernels(SymbolicBackend(params), encode=False,
                                       mask_output=False)[-1]
    room_level = before_last.out_level - steps[-1].attrs.get("room_below", 0)
    bits_left = sum(params.coeff_mod_bits[: room_level + 1]) - 1
    # the bits above the headroom are shared by the incoming scale and the weights' scale: an
    # even split (never below 2^20 for the weights) gave the smallest logit error
    weight_bits = max(MIN_WEIGHT_SCALE_BITS, (bits_left - headroom) // 2)
    if steps[-1].attrs.get("room_below") and bits_left - headroom - weight_bits < MIN_SCALE_BITS:
        # (only checked for the mask level; the folded default keeps its earlier behaviour)
        raise ModelFormatError(
            f"the unrescaled last layer has {bits_left} bits at level {room_level} "
            f"({params.describe()}): too few for 2^{MIN_SCALE_BITS} inputs, 2^{weight_bits} "
            f"weights and {headroom} bits of output; give the first prime more bits (a larger "
            "ring), let the last layer rescale (--precise) or fold the output mask")
    excess = math.log2(before_last.out_scale) - (bits_left - headroom - weight_bits)
    if excess <= 0:
        return
    acts = [i for i, s in enumerate(steps[:-1]) if s.op in ("square", "poly2", "poly")]
    if acts and steps[acts[-1]].op == "poly":
        # the generic polynomial sets its own output scale (its coefficients are encoded lower):
        # lowering it there keeps the powers x^(2^j) at full precision
        steps[acts[-1]].attrs["scale_down_bits"] = math.ceil(excess)
        return
    squares = [i for i, s in enumerate(steps[:-1]) if s.op in ("square", "poly2")]
    before = squares[-1] if squares else len(steps) - 1
    linear = [i for i in range(before) if steps[i].op in LINEAR_OPS + ("conv2d_im2col",)]
    if not linear:
        raise ModelFormatError("no linear layer to lower the scale before the final dense layer")
    factor = 2 if squares else 1
    steps[linear[-1]].attrs["scale_down_bits"] = math.ceil(excess / factor)
