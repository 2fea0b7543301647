"""The plan check: run a plan on inputs and compare with plaintext, before anyone relies on it.

Methods (`CheckRecord.method`):
- "ckks": a real CKKS run at the plan's own parameters (keys made here, both roles in this
  process), the default whenever it takes well under a minute;
- "modelled": for plans where a real run would take minutes, the plan's kernels on
  `NoisyPlainBackend` (the exact arithmetic of the plan plus a model of CKKS's errors). Stated
  as such wherever the record is printed.

Both also run the plan on `PlainBackend` for the *range analysis*: the smallest headroom, in
bits, between any value x scale and half the modulus at its level (junk slots included). A
value that would wrap is found before any ciphertext exists.

A plan passes when top-1 agreement with the reference is >= `min_agreement` (99%), the largest
output error is <= the bound (by default 5% of the largest |reference output|: a relative bound
that is independent of the model's logit scale) and no value comes within 1 bit of wrapping.
The record is stored in the plan (`metadata["check"]`); servers refuse plans without one
unless forced (docs/COMPILER.md, "The plan check").
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, Field

from heinfer import __version__
from heinfer.backends.plain import NoisyPlainBackend, PlainBackend, RangeLog
from heinfer.codec import encode_encrypt, finish_output
from heinfer.plan import CompiledPlan, Plan

CHECK_KEY = "check"
MIN_AGREEMENT = 0.99
REL_ERROR_BOUND = 0.05
MIN_MARGIN_BITS = 1.0
MIN_INPUTS = 8
# a real run longer than this (predicted) is replaced by the modelled check
MAX_REAL_CHECK_S = 60.0


class CheckRecord(BaseModel):
    """What was checked, how, and the outcome (stored in the plan's metadata)."""

    method: str = Field(description="ckks (real run) or modelled (NoisyPlainBackend)")
    method_note: str = Field(default="", description="why this method (auto)")
    reference: str = Field(description="what the outputs were compared with")
    inputs: int
    agreement: float = Field(description="top-1 agreement with the reference")
    predicted_agreement: float = Field(
        description="expected top-1 agreement on `agreement_inputs` plaintext inputs, from their "
                    "reference outputs and the measured error's spread (see agreement_estimate)")
    agreement_inputs: int = 0
    max_error: float = Field(description="largest |output - reference| over all outputs")
    mean_error: float
    error_bound: float
    max_abs_reference: float
    min_margin_bits: float = Field(description="smallest headroom to wrapping, bits")
    margin_at: str = Field(description="the step where it is smallest")
    seconds: float
    eval_ms: float | None = Field(default=None, description="mean encrypted evaluation time "
                                  "per input (real runs only)")
    passed: bool
    reasons: list[str] = Field(default_factory=list)
    heinfer_version: str = __version__
    date: str = ""

    def summary(self) -> str:
        how = ("real CKKS run" if self.method == "ckks"
               else "modelled CKKS errors, not a real run")
        if self.method_note:
            how += f": {self.method_note}"
        head = (f"plan check ({how}, {self.inputs} inputs, against {self.reference}): "
                f"{'passed' if self.passed else 'FAILED'}; top-1 agreement "
                f"{100 * self.agreement:.1f}% (expected {100 * self.predicted_agreement:.1f}% on "
                f"{self.agreement_inputs} inputs), max error {self.max_error:.3g} (bound "
                f"{self.error_bound:.3g}, largest |output| {self.max_abs_reference:.3g}), "
                f"smallest headroom {self.min_margin_bits:.1f} bits at {self.margin_at}, "
                f"{self.seconds:.1f} s"
                + (f" ({self.eval_ms:.0f} ms per encrypted evaluation)" if self.eval_ms else ""))
        return head + "".join(f"\n  - {r}" for r in self.reasons)


def _run_kernels(compiled: CompiledPlan, be, x: np.ndarray, log: RangeLog | None) -> np.ndarray:
    spec = compiled.spec
    cts = encode_encrypt(be, spec, x)
    run_on = compiled.wrap(be)
    for i, k in enumerate(compiled.kernels):
        if log is not None:
            log.label = f"step {i} ({k.name})"
        cts = k.run(run_on, cts)
    return finish_output(spec, spec.decode([be.decrypt(c) for c in cts]), x)


def run_plain(plan: Plan, xs: np.ndarray, noise: bool = False,
              seed: int = 0) -> tuple[list[np.ndarray], RangeLog]:
    """The plan's outputs computed in the clear (with modelled CKKS errors if `noise`), and the
    range log of that run."""
    be = NoisyPlainBackend(plan.params, seed) if noise else PlainBackend(plan.params)
    compiled = CompiledPlan(plan, be)
    outs = [_run_kernels(compiled, be, x, be.log) for x in xs]
    return outs, be.log


def run_ckks(plan: Plan, xs: np.ndarray,
             backend: str = "tenseal") -> tuple[list[np.ndarray], list[float]]:
    """Real CKKS: keys made here, each input encrypted, evaluated and decrypted. Returns the
    outputs and the evaluation seconds per input."""
    from heinfer.backends import make_backend

    be = make_backend(plan.params, backend)
    compiled = CompiledPlan(plan, be)
    be.generate_keys(compiled.spec.rotation_steps)
    outs, secs = [], []
    for x in xs:
        cts = encode_encrypt(be, compiled.spec, x)
        t = time.perf_counter()
        out = compiled.run(cts)
        secs.append(time.perf_counter() - t)
        outs.append(finish_output(compiled.spec, compiled.spec.decode([be.decrypt(c)
                                                                        for c in out]), x))
    return outs, secs


def estimated_real_seconds(plan: Plan, n_inputs: int) -> float:
    """Rough time of a real check: this machine's calibration when there is one, else operation
    counts weighted by ring degree and primes (about 0.1 ms per plaintext multiply at n=8192
    with 5 primes, a key switch as 20 of them)."""
    from heinfer_packing.calibrate import calibration_path, load_or_calibrate
    from heinfer_packing.report import report

    if calibration_path(plan.params).exists():
        rep = report(plan, load_or_calibrate(plan.params))
        per = (rep.predicted_ms or 0.0) / 1e3
    else:
        rep = report(plan)
        ring = plan.params.poly_modulus_degree / 8192
        units = 0.0
        for lr in rep.layers:
            for (op, level), count in lr.ops.items():
                ks = op.removesuffix("_inplace") in ("rotate", "square", "multiply")
                units += count * ring * (20 * (level + 1) ** 2 / 25 if ks else (level + 1) / 5)
        per = units * 1e-4
    keygen = 0.02 * len(rep.rotation_steps) * plan.params.poly_modulus_degree / 8192
    return per * n_inputs * 1.5 + keygen  # encryption, decryption and building the kernels


def agreement_estimate(refs: np.ndarray, error_sd: float) -> float:
    """Expected top-1 agreement when every output gets an independent N(0, error_sd^2) error:
    per input, the probability that no runner-up overtakes the top output (its gap over
    error_sd * sqrt(2)). 8 real runs measure the error's spread well but agreement coarsely;
    this turns the spread into agreement over many plaintext inputs (on issue #11's sigmoid/tanh
    model: 96.1% expected, 96.5% measured on 200 real runs)."""
    refs = np.asarray(refs, dtype=np.float64).reshape(len(refs), -1)
    if error_sd <= 0:
        return 1.0
    gaps = refs.max(axis=1, keepdims=True) - refs
    z = gaps / (error_sd * math.sqrt(2.0))
    overtake = 0.5 * np.vectorize(math.erfc)(z / math.sqrt(2.0))
    keep = np.where(gaps > 0, 1.0 - overtake, 1.0)  # the top itself: 1
    return float(np.mean(np.prod(keep, axis=1)))


def check_plan(plan: Plan, xs: np.ndarray, reference: Callable[[np.ndarray], np.ndarray] | None
               = None, reference_name: str = "the model in plaintext", method: str = "auto",
               max_error: float | None = None, min_agreement: float = MIN_AGREEMENT,
               backend: str | None = None, agreement_xs: np.ndarray | None = None
               ) -> CheckRecord:
    """Check `plan` on inputs `xs` against `reference(x)` (default: the plan's own exact
    arithmetic, `PlainBackend`). `method`: "ckks", "modelled" or "auto" (real unless it would
    take over a minute). `agreement_xs`: more inputs (plaintext only) for the expected
    agreement; default `xs`."""
    xs = np.asarray(xs, dtype=np.float64)
    t0 = time.perf_counter()
    plain, log = run_plain(plan, xs)
    if reference is None:
        refs, reference_name = plain, "the plan's own arithmetic in plaintext (PlainBackend)"
    else:
        refs = [np.asarray(reference(x), dtype=np.float64) for x in xs]
    note = ""
    if method == "auto":
        est = estimated_real_seconds(plan, len(xs))
        method = "ckks" if est <= MAX_REAL_CHECK_S else "modelled"
        if method == "modelled":
            note = f"a real run would take about {est / 60:.0f} min"
    eval_ms = None
    if method == "ckks":
        outs, secs = run_ckks(plan, xs, backend or plan.backend_name)
        eval_ms = 1e3 * float(np.mean(secs))
    elif method == "modelled":
        outs, _ = run_plain(plan, xs, noise=True)
    else:
        raise ValueError(f"check method {method!r}: choose auto, ckks or modelled")
    errs = [np.abs(np.asarray(o) - r) for o, r in zip(outs, refs, strict=True)]
    max_abs = float(max(np.abs(r).max() for r in refs))
    bound = max_error if max_error is not None else REL_ERROR_BOUND * max_abs
    agreement = float(np.mean([int(np.argmax(o)) == int(np.argmax(r))
                               for o, r in zip(outs, refs, strict=True)]))
    error_sd = float(np.std(np.concatenate([(np.asarray(o) - r).ravel()
                                            for o, r in zip(outs, refs, strict=True)])))
    if agreement_xs is None:
        big = refs
    else:
        ref_fn = reference or (lambda x: run_plain(plan, x[None])[0][0])
        big = [np.asarray(ref_fn(x), dtype=np.float64) for x in agreement_xs]
    predicted = agreement_estimate(np.asarray(big), error_sd)
    worst = log.worst()
    rec = CheckRecord(
        method=method, method_note=note, reference=reference_name, inputs=len(xs),
        agreement=agreement,
        predicted_agreement=predicted, agreement_inputs=len(big),
        max_error=float(max(e.max() for e in errs)),
        mean_error=float(np.mean([e.mean() for e in errs])), error_bound=float(bound),
        max_abs_reference=max_abs,
        min_margin_bits=float(worst.margin_bits) if worst else math.inf,
        margin_at=worst.label if worst else "-", seconds=time.perf_counter() - t0,
        eval_ms=eval_ms, passed=True, date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    rec.reasons = _reasons(rec, plan, min_agreement)
    rec.passed = not rec.reasons
    return rec


def _reasons(rec: CheckRecord, plan: Plan, min_agreement: float) -> list[str]:
    """Why the check failed, each with what to change."""
    out = []
    last = plan.steps[-1]
    unrescaled = last.op == "dense" and not last.attrs.get("rescale", True)
    advice = ("compile with --precise (the last layer keeps its rescale)" if unrescaled
              else f"raise --scale-bits above {plan.params.scale_bits} (more precision per "
                   "level), or a lower --degree for the fitted activations")
    if rec.min_margin_bits < MIN_MARGIN_BITS:
        out.append(f"overflow: at {rec.margin_at} a value comes within "
                   f"{rec.min_margin_bits:.1f} bits of wrapping around the modulus (CKKS "
                   "would return garbage): "
                   + ("compile with --precise (a larger first prime)" if unrescaled else
                      "lower --scale-bits, or narrow the activations' input range "
                      "(calibration data that matches the model's inputs)"))
    if rec.agreement < min_agreement:
        out.append(f"top-1 agreement {100 * rec.agreement:.1f}% is below "
                   f"{100 * min_agreement:.0f}%: {advice}")
    elif rec.predicted_agreement < min_agreement:
        out.append(f"expected top-1 agreement {100 * rec.predicted_agreement:.1f}% on "
                   f"{rec.agreement_inputs} inputs (from the measured error's spread) is below "
                   f"{100 * min_agreement:.0f}%: {advice}")
    if rec.max_error > rec.error_bound:
        out.append(f"max output error {rec.max_error:.3g} is above the bound "
                   f"{rec.error_bound:.3g}: {advice}")
    return out


def checked(plan: Plan, xs: np.ndarray,
            reference: Callable[[np.ndarray], np.ndarray] | None = None,
            reference_name: str = "the model in plaintext", method: str = "ckks") -> Plan:
    """`plan` with a passed check record, or PlanCheckError saying why not (for programs
    that lower a model themselves instead of through `heinfer compile`)."""
    from heinfer.errors import PlanCheckError

    plan.metadata.pop(CHECK_KEY, None)
    rec = check_plan(plan, xs, reference, reference_name, method=method)
    if not rec.passed:
        raise PlanCheckError(f"plan {plan.name} fails its check:\n{rec.summary()}")
    return with_record(plan, rec)


def record_of(plan: Plan) -> CheckRecord | None:
    doc = plan.metadata.get(CHECK_KEY)
    return CheckRecord.model_validate(doc) if doc else None


def with_record(plan: Plan, rec: CheckRecord) -> Plan:
    """The plan with `rec` stored (the record is part of the plan's content and hash)."""
    plan.metadata[CHECK_KEY] = rec.model_dump()
    return plan


def verify_main(argv: list[str] | None = None) -> int:
    """`heinfer verify PLAN.plan.json --inputs FILE.npz`: run the plan encrypted on the inputs
    (npz with `x` of shape (N, *input_shape), optional labels `y`) and print agreement, error and
    time against the plan's own arithmetic in plaintext. `--record` stores the result in the
    plan (how a plan compiled before checks existed gets its record)."""
    import argparse
    import sys

    from heinfer.errors import HeinferError

    ap = argparse.ArgumentParser(prog="heinfer verify", description=verify_main.__doc__
                                 .splitlines()[0].strip("`"))
    ap.add_argument("plan", help="NAME.plan.json (NAME.plan.npz beside it)")
    ap.add_argument("--inputs", required=True, help="npz with x (N, ...) and optional y")
    ap.add_argument("--limit", type=int, help="use the first N inputs only")
    ap.add_argument("--method", choices=["ckks", "modelled", "auto"], default="ckks")
    ap.add_argument("--backend", default=None, help="default: the backend the plan names")
    ap.add_argument("--max-error", type=float)
    ap.add_argument("--record", action="store_true",
                    help="write the check record into the plan files (if it passes)")
    args = ap.parse_args(argv)
    try:
        plan = Plan.load(args.plan)
        try:
            with np.load(args.inputs) as data:
                xs = np.asarray(data["x"], dtype=np.float64)
                ys = np.asarray(data["y"]) if "y" in data else None
        except (OSError, KeyError, ValueError) as e:
            raise HeinferError(f"cannot read inputs {args.inputs} (an npz with an array x): "
                               f"{e}") from e
        if args.limit:
            xs, ys = xs[: args.limit], None if ys is None else ys[: args.limit]
        if xs.ndim < 2 or tuple(xs.shape[1:]) != tuple(plan.input_shape):
            raise HeinferError(f"inputs x have shape {xs.shape}; plan {plan.name} takes "
                               f"(N, {', '.join(map(str, plan.input_shape))})")
        stored = record_of(plan)
        rec = check_plan(plan, xs, method=args.method, max_error=args.max_error,
                         backend=args.backend)
        print(rec.summary())
        if ys is not None:
            plain, _ = run_plain(plan, xs)
            acc = float(np.mean([int(np.argmax(p)) == int(y) for p, y in zip(plain, ys,
                                                                              strict=True)]))
            print(f"plaintext accuracy of the plan on the labels: {100 * acc:.1f}%")
        if stored is not None:
            print(f"record stored in the plan: {stored.summary()}")
        else:
            print("the plan carries no check record (servers refuse it unless forced; "
                  "--record stores this one)")
        if args.record:
            if not rec.passed:
                raise HeinferError("not recorded: the check failed")
            plan.metadata.pop(CHECK_KEY, None)
            path = with_record(plan, rec).save(str(args.plan).removesuffix(".plan.json"))
            print(f"recorded in {path} (new plan hash {plan.hash()})")
        return 0 if rec.passed else 1
    except HeinferError as e:
        print(f"heinfer verify: error: {e}", file=sys.stderr)
        return 2
