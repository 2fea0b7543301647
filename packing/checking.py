"""The compiler's side of the plan check (heinfer.check): which inputs, what the reference is,
and what happens when a plan fails.

Every plan `heinfer compile` writes carries a passed check record. When the check fails, the
compiler tries the safer settings in order (the last layer's rescale kept, i.e. --precise; then
6 more scale bits) and checks each. If the user left the precision to the compiler (no
--precise, no --scale-bits: the default and --objective), the first setting that passes is used
and the report says so. If the user fixed them, nothing is written: the error says why and which
setting passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from heinfer.check import CheckRecord, check_plan, with_record
from heinfer.errors import PlanCheckError
from heinfer.plan import Plan
from heinfer.reference import forward_layer
from heinfer_packing.modelfile import Model

MIN_CHECK_INPUTS = 8
RANGE_MARGIN = 2.0
AGREEMENT_INPUTS = 200  # plaintext inputs for the expected agreement (cheap: numpy only)


@dataclass(frozen=True)
class Setting:
    """Precision settings a retry may change."""

    precise: bool = False
    scale_bits: int | None = None

    def flags(self) -> str:
        out = (["--precise"] if self.precise else []) + (
            [f"--scale-bits {self.scale_bits}"] if self.scale_bits else [])
        return " ".join(out) or "the defaults"


def check_inputs(model: Model, calib_x: np.ndarray | None,
                 n: int = AGREEMENT_INPUTS) -> tuple[np.ndarray, str]:
    """Up to `n` inputs for the check (the real run takes the first few, the expected
    agreement all): calibration inputs; without them, Fashion-MNIST training images when the
    model takes one channel of at least 28x28 (the zoo), else N(0, 1) noise."""
    if calib_x is not None and len(calib_x) >= MIN_CHECK_INPUTS:
        return np.asarray(calib_x[:n], dtype=np.float64), "calibration inputs"
    shape = tuple(model.input_shape)
    if len(shape) == 3 and shape[0] == 1 and min(shape[1:]) >= 28:
        try:
            from heinfer_models import fashion_mnist

            images, _ = fashion_mnist.load("train")
            return (fashion_mnist.normalize(images[-n:], shape),
                    "Fashion-MNIST training images (no calibration data given)")
        except (OSError, FileNotFoundError, ValueError):
            pass
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *shape)), "N(0,1) noise (no calibration data given)"


def measure_ranges(model: Model, xs: np.ndarray) -> dict[str, float]:
    """Largest |output| of every layer on `xs`: the range analysis that sizes the first prime
    and the last layer's headroom (`lower` reads `metadata["max_abs"]`)."""
    out: dict[str, float] = {}
    for x in xs:
        for layer in model.layers:
            x = forward_layer(layer, x)
            out[layer.name] = max(out.get(layer.name, 0.0), float(np.max(np.abs(x))))
    # margin: unseen inputs go beyond the calibration's largest value (issue #11's model: 5.4
    # on 8 calibration images, 7.9 on 200 test images)
    return {k: RANGE_MARGIN * v for k, v in out.items()}


def safer_settings(current: Setting, unrescaled_last: bool) -> list[Setting]:
    ladder = []
    if not current.precise and unrescaled_last:
        ladder.append(Setting(True, current.scale_bits))
    base = current.scale_bits or 29
    if base + 6 <= 40:
        ladder.append(Setting(True, base + 6))
    return ladder


def check_and_retry(plan: Plan, model: Model, inputs: np.ndarray, source: str,
                    relower: Callable[[Setting], Plan], current: Setting, may_retry: bool,
                    method: str = "auto", max_error: float | None = None,
                    n_run: int = MIN_CHECK_INPUTS,
                    log: Callable[[str], None] = print) -> tuple[Plan, CheckRecord, str]:
    """Check `plan` (a run on the first `n_run` of `inputs`, the expected agreement on all);
    on failure try safer settings. Returns (plan with its record, the record, a text for the
    report) or raises PlanCheckError saying why and what to change."""
    xs = inputs[: max(n_run, MIN_CHECK_INPUTS)]
    ref_name = f"the HE-friendly model in plaintext (numpy), {source}"

    def run(p: Plan) -> CheckRecord:
        return check_plan(p, xs, model.forward, ref_name, method=method, max_error=max_error,
                          agreement_xs=inputs)

    rec = run(plan)
    log(rec.summary())
    if rec.passed:
        return with_record(plan, rec), rec, rec.summary()
    last = plan.steps[-1]
    unrescaled = last.op == "dense" and not last.attrs.get("rescale", True)
    for setting in safer_settings(current, unrescaled):
        try:
            alt = relower(setting)
        except Exception as e:  # noqa: BLE001  (a setting that does not fit: try the next)
            log(f"  {setting.flags()}: cannot compile ({e})")
            continue
        alt_rec = run(alt)
        log(f"  retry with {setting.flags()}: {alt_rec.summary()}")
        if not alt_rec.passed:
            continue
        if may_retry:
            text = (f"{rec.summary()}\nretried with {setting.flags()} (the precision was left "
                    f"to the compiler):\n{alt_rec.summary()}")
            return with_record(alt, alt_rec), alt_rec, text
        raise PlanCheckError(
            f"the plan fails its check, nothing written:\n{rec.summary()}\nwith "
            f"{setting.flags()} it passes ({100 * alt_rec.agreement:.1f}% agreement, max "
            f"error {alt_rec.max_error:.3g}): recompile with {setting.flags()}")
    raise PlanCheckError(
        f"the plan fails its check, nothing written:\n{rec.summary()}\nno safer setting "
        "passed either: try a lower --degree or calibration data closer to the model's "
        "inputs (narrower activation ranges), or a model trained for HE (bounded "
        "activations, see heinfer_models.train)")
