"""Plan a sanitized model: measure the output noise the flooding must drown, check the room.

`sanitize_plan` runs the plan on real CKKS (a throwaway client key) on calibration images,
measures the rms deviation of the output slots from numpy (real and imaginary parts), and
records it with the statistical security in `metadata["privacy"]` (`heinfer.sanitize.FloodSpec`).
It refuses a plan whose last level cannot hold the answer plus the flooding, and reports the
error the flooding adds, so the owner can trade bits of security for precision or choose
parameters with more precision (docs/COMPILER.md, "Sanitized outputs").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from heinfer.backends import make_backend
from heinfer.codec import encode_encrypt
from heinfer.errors import ModelFormatError
from heinfer.plan import CompiledPlan, Plan
from heinfer.sanitize import DEFAULT_STAT_BITS, PRIVACY, FloodSpec, check_room


def expected_slots(plan: Plan, model, x: np.ndarray) -> np.ndarray:
    """The values the answer slots must decode to (before the spec's output scale), by numpy:
    the logits, or z = M x and q = |R x|^2 for a conformal plan."""
    if plan.steps[-1].op == "conformal":
        w, n = plan.steps[-1].weight, plan.steps[-1].attrs["n_logits"]
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        return np.concatenate([w[:n] @ v, [np.sum((w[n:] @ v) ** 2)]])
    return np.asarray(model.forward(x)).reshape(-1) / plan.output_scale


def measure_noise(plan: Plan, model, xs: np.ndarray) -> tuple[float, float]:
    """(rms deviation of the answer slots from numpy, real and imaginary parts, for the output
    ciphertext where it is largest (one flooding covers all: a conformal plan's q is noisier
    than its z); largest |answer|) over `xs`, on the masked plan as served."""
    be = make_backend(plan.params)
    compiled = CompiledPlan(plan, be)
    spec = compiled.spec
    be.generate_keys(spec.rotation_steps)
    ct_idx, slot_idx = spec.output_layout_obj().positions()
    devs: dict[int, list[np.ndarray]] = {}
    largest = 0.0
    for x in xs:
        out = compiled.run(encode_encrypt(be, spec, x))
        vectors = [be.decrypt_complex(c) for c in out]
        got = np.array([vectors[c][s] for c, s in zip(ct_idx, slot_idx, strict=True)])
        want = expected_slots(plan, model, x)
        for c in set(ct_idx.tolist()):
            dev = (got - want)[ct_idx == c]
            devs.setdefault(c, []).extend([dev.real, dev.imag])
        largest = max(largest, float(np.max(np.abs(want))))
    rms = max(float(np.sqrt(np.mean(np.concatenate(d) ** 2))) for d in devs.values())
    return rms, largest


def sanitize_plan(plan: Plan, model, xs: np.ndarray, stat_bits: int = DEFAULT_STAT_BITS,
                  queries: int = 1, noise_rms: float | None = None) -> Plan:
    """A copy of `plan` whose outputs the server re-randomizes and floods (heinfer.sanitize),
    with the noise measured on `xs` (a few calibration images). `noise_rms`: flood for this
    rms instead (at least the measured one), e.g. the same for every version of a model, so
    the published flooding does not follow weight updates. Raises ModelFormatError when the
    output level cannot hold the answer plus the flooding."""
    if len(xs) < 1:
        raise ModelFormatError("sanitizing needs calibration images to measure the noise")
    rms, largest = measure_noise(plan, model, xs)
    if noise_rms is not None and noise_rms < rms:
        raise ModelFormatError(f"noise_rms {noise_rms:.3g} is below the {rms:.3g} measured "
                               f"on {len(xs)} images: the flooding would not cover it")
    flood = FloodSpec(stat_bits=stat_bits, queries=queries,
                      noise_rms=max(noise_rms or rms, 1e-300), images=len(xs))
    from heinfer.backends.symbolic import SymbolicBackend

    last = plan.build_kernels(SymbolicBackend(plan.params), encode=False)[-1]
    try:
        check_room(plan.params, last.out_level, last.out_scale, 1.5 * largest, flood.sigma)
    except Exception as e:
        raise ModelFormatError(f"cannot sanitize {plan.name} at {stat_bits} bits: {e}") from e
    out = replace(plan, steps=list(plan.steps), labels=list(plan.labels),
                  metadata={**plan.metadata, PRIVACY: flood.model_dump()})
    return out


def flooded_error(plan: Plan) -> float | None:
    """The logit error the flooding adds (3 sigma, in logit units), or None (not sanitized)."""
    doc = plan.metadata.get(PRIVACY)
    return None if doc is None else 3 * FloodSpec(**doc).sigma * plan.output_scale
