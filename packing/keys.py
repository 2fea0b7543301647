"""Galois key budget as a compiler post-pass: `lower()` gives a plan with a key per rotation
step; `apply_key_budget` keeps at most N keys (or what N MB of keys allows) and composes the
other steps from them at run time (`heinfer.rotations`, docs/COMPILER.md "Galois key budget").

The key set is chosen from the kernels' rotations per step, each weighted by this machine's
calibrated rotation time at its level when a calibration is given (a rotation at the top level
costs several times one at level 0), and stored in the plan (`metadata["galois_keys"]`).
"""

from __future__ import annotations

from heinfer.errors import KeyBudgetError
from heinfer.plan import Plan
from heinfer.rotations import power_of_two_keys
from heinfer_packing.calibrate import calibrate_command


def keys_for_mb(max_key_mb: float, calibration: dict) -> int:
    """How many Galois keys fit `max_key_mb` MB of evaluation keys next to the relinearization
    key, with the calibrated (seeded) key sizes of the plan's parameters."""
    sizes = calibration["sizes"]
    room = max_key_mb * 1e6 - sizes["relin_key_bytes"]
    return max(0, int(room // sizes["galois_key_bytes"]))


def apply_key_budget(plan: Plan, max_keys: int | None = None, keys: list[int] | None = None,
                     calibration: dict | None = None, max_key_mb: float | None = None) -> Plan:
    """A copy of `plan` with at most `max_keys` Galois keys (and at most `max_key_mb` MB of
    evaluation keys), or with exactly the keyed steps `keys`. KeyBudgetError when the budget
    cannot compose every rotation the kernels need."""
    if max_key_mb is not None:
        if calibration is None:
            raise KeyBudgetError(
                f"a key-size limit needs the key sizes of {plan.params.describe()}: calibrate "
                f"this machine first (heinfer-compile --calibrate, or "
                f"`{calibrate_command(plan.params)}`), or give a key count (--max-keys)")
        fit = keys_for_mb(max_key_mb, calibration)
        max_keys = fit if max_keys is None else min(max_keys, fit)
    rotate_ms = calibration["ms"].get("rotate") if calibration else None
    try:
        return plan.with_key_budget(max_keys, keys, rotate_ms)
    except KeyBudgetError as e:
        if keys is not None or max_keys is None:
            raise
        least = smallest_key_budget(plan, max_keys, rotate_ms)
        size = ""
        if calibration is not None:
            sizes = calibration["sizes"]
            mb = (sizes["relin_key_bytes"] + least * sizes["galois_key_bytes"]) / 1e6
            size = f", about {mb:.1f} MB of evaluation keys (--max-key-mb {mb:.1f})"
        raise KeyBudgetError(f"{e}; the smallest budget that works for this plan is {least} "
                             f"Galois keys (--max-keys {least}){size}") from e


def smallest_key_budget(plan: Plan, above: int, rotate_ms: dict | None = None) -> int:
    """The fewest Galois keys (more than `above`) that compose every rotation of the plan:
    a bisection over key counts with the compiler's own key choice, then confirmed on the
    plan (one key per rotation step always works)."""
    from heinfer.rotations import choose_keys

    weights: dict[int, float] = {}
    for (step, level), n in plan.rotation_counts().items():
        cost = 1.0 if rotate_ms is None else float(rotate_ms.get(str(level), 1.0))
        weights[step] = weights.get(step, 0.0) + n * cost
    slots = plan.params.slots
    lo, hi = max(0, above), len({s % slots for s in weights} - {0})

    def works(b: int) -> bool:
        try:
            choose_keys(weights, slots, b)
            return True
        except KeyBudgetError:
            return False

    while lo + 1 < hi:  # works(hi) holds: a key per step
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    while hi < len(weights):
        try:
            plan.with_key_budget(hi, rotate_ms=rotate_ms)
            break
        except KeyBudgetError:
            hi += 1
    return hi


def budget_variants(plan: Plan, calibration: dict | None = None, max_keys: int | None = None,
                    max_key_mb: float | None = None) -> list[tuple[str, Plan]]:
    """Key-budget variants of a plan for the search: 3/4 and 1/2 of its rotation steps, the
    power-of-two keys, and what `max_keys` / `max_key_mb` allow; each labelled "N keys" or
    "pow2 keys". Budgets that cannot work or repeat a key count are left out."""
    steps = sorted({s for s, _ in plan.rotation_counts()})
    n = len(steps)
    if n < 2:
        return []
    budgets = {(3 * n) // 4, n // 2}
    if max_keys is not None:
        budgets.add(max_keys)
    if max_key_mb is not None and calibration is not None:
        budgets.add(keys_for_mb(max_key_mb, calibration))
    out: list[tuple[str, Plan]] = []
    seen = {n}
    for b in sorted(budgets, reverse=True):
        if not 1 <= b < n:
            continue
        try:
            variant = apply_key_budget(plan, b, calibration=calibration)
        except KeyBudgetError:
            continue
        k = len(variant.key_budget["steps"])
        if k not in seen:
            seen.add(k)
            out.append((f"{k} keys", variant))
    pow2 = power_of_two_keys(steps, plan.params.slots)
    if len(pow2) < n:
        try:
            variant = plan.with_key_budget(keys=pow2)
        except KeyBudgetError:
            return out
        if all(variant.key_budget["steps"] != v.key_budget["steps"] for _, v in out):
            out.append(("pow2 keys", variant))
    return out
