"""The compiler's report: per layer, the layout, HE operation counts by level, levels and the
predicted time; totals for depth, ring, key and upload sizes and latency.

Counts come from running the plan's kernels on the data-free `SymbolicBackend` (exact, instant);
times from the per-operation calibration of this machine (`heinfer_packing.calibrate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from heinfer.backends.counting import CountingBackend
from heinfer.backends.symbolic import SymbolicBackend
from heinfer.plan import CompiledPlan, Plan, PlanStep
from heinfer.rotations import RotationKeys
from heinfer_packing.calibrate import calibrate_command


@dataclass
class LayerReport:
    name: str
    out_layout: str
    level_in: int
    level_out: int
    ops: dict[tuple[str, int], int] = field(default_factory=dict)
    predicted_ms: float | None = None
    macs: int = 0          # multiply-accumulates of the layer in clear
    reduce_width: int = 0  # how many products each output sums
    n_in: int = 1          # input ciphertexts: sums across them need no rotation

    def count(self, op: str) -> int:
        return sum(n for (o, _), n in self.ops.items() if o == op)


@dataclass
class PlanReport:
    plan: Plan
    layers: list[LayerReport]
    rotation_steps: list[int]  # the keyed steps (Galois keys the client makes)
    calibration: dict | None
    rotations: RotationKeys | None = None  # the key budget's routes, if the plan has one

    @property
    def predicted_ms(self) -> float | None:
        """HE layers plus reading the input and writing the output ciphertexts."""
        if self.calibration is None:
            return None
        return sum(layer.predicted_ms or 0.0 for layer in self.layers) + (self.io_ms or 0.0)

    @property
    def io_ms(self) -> float | None:
        ms = (self.calibration or {}).get("ms", {})
        if "serialize" not in ms or "deserialize_fresh" not in ms:
            return None
        load = next(iter(ms["deserialize_fresh"].values()))
        out_level = str(self.layers[-1].level_out)
        n_out = 1  # every plan here ends in one output ciphertext
        return self.plan.input_layout.n_ct * load + n_out * ms["serialize"].get(out_level, 0.0)

    def key_bytes(self) -> int | None:
        if self.calibration is None:
            return None
        s = self.calibration["sizes"]
        return s["relin_key_bytes"] + s["galois_key_bytes"] * len(self.rotation_steps)

    def lower_bound_ms(self) -> float | None:
        """Op-count lower bound: per linear layer, MACs / slots plaintext multiplies plus
        log2(reduction width / input ciphertexts) rotations, at the layer's level, with this
        machine's costs. No packing can do with fewer multiplies; the w products of one output
        lie in at most `n_in` ciphertexts (summed there by additions), so some ciphertext holds
        w / n_in of them, which take log2(w / n_in) rotations to sum. Each operation is priced
        at the cheapest level the layer spans (a kernel may rescale or mod-switch first). The
        bound used to count log2(w) rotations at the input level: an im2col first layer, whose
        taps arrive in separate ciphertexts and whose sums rotate after the rescale, came out
        dearer than its plan (fmnist-cryptonets "predicted at 0.9x the bound")."""
        if self.calibration is None:
            return None
        ms, slots = self.calibration["ms"], self.plan.params.slots

        def cheapest(op: str, r: LayerReport) -> float:
            levels = range(r.level_out, r.level_in + 1)
            return min(ms[op][str(lv)] for lv in levels if str(lv) in ms[op])

        total = 0.0
        for r in self.layers:
            if r.macs:
                total += r.macs / slots * cheapest("multiply_plain", r)
                total += (math.log2(max(1.0, r.reduce_width / r.n_in))
                          * cheapest("rotate", r))
        return total

    def upload_bytes(self) -> int | None:
        if self.calibration is None:
            return None
        return self.calibration["sizes"]["seeded_ciphertext_bytes"] * self.plan.input_layout.n_ct

    def to_text(self) -> str:
        p = self.plan
        lines = [f"plan {p.name} ({p.hash()}): {p.params.describe()}",
                 f"input layout {p.input_layout} ({p.input_layout.n_ct} ciphertext(s))", "",
                 f"| {'layer':<14}| {'output layout':<44}| lvl  | rot | mul_pt | mul | resc "
                 f"| pred ms |",
                 f"|{'-' * 15}|{'-' * 45}|------|-----|--------|-----|------|---------|"]
        for r in self.layers:
            pred = f"{r.predicted_ms:7.1f}" if r.predicted_ms is not None else "      -"
            lines.append(
                f"| {r.name:<14}| {r.out_layout[:44]:<44}| {r.level_in}->{r.level_out} "
                f"| {r.count('rotate'):>3} | {r.count('multiply_plain'):>6} "
                f"| {r.count('square') + r.count('multiply'):>3} | {r.count('rescale'):>4} "
                f"| {pred} |")
        lines.append("")
        lines.append(f"depth {p.params.top_level - self.layers[-1].level_out}, ring degree "
                     f"{p.params.poly_modulus_degree}, {len(self.rotation_steps)} rotation "
                     f"steps {self.rotation_steps}")
        c = p.metadata.get("compact")
        if c and c.get("points"):
            prices = ", ".join(f"{k} {v:.0f}" for k, v in c.get("prices", {}).items())
            lines.append(f"compaction after the pools at steps {c['points']}: chosen "
                         f"{c.get('chosen')!r} ({prices} {c.get('unit', '')})")
        if self.rotations is not None:
            rk = self.rotations
            lines.append(f"Galois key budget {rk.max_keys if rk.max_keys is not None else '-'}"
                         f": {rk.describe()} (rotations above count every composed step)")
        if self.calibration is not None:
            io = (f", of which {self.io_ms:.1f} ms reading and writing ciphertexts"
                  if self.io_ms is not None else "")
            lines.append(f"evaluation keys {self.key_bytes() / 1e6:.1f} MB (seeded), upload "
                         f"{self.upload_bytes() / 1e3:.0f} KB per image, predicted latency "
                         f"{self.predicted_ms:.1f} ms{io} (calibrated "
                         f"{self.calibration['date']})")
            bound = self.lower_bound_ms()
            he = self.predicted_ms - (self.io_ms or 0.0)
            if bound:  # batch plans (batch_linear steps) have no bound here
                lines.append(f"op-count lower bound {bound:.1f} ms (MACs/slots plaintext "
                             f"multiplies + log2(width) rotations per linear layer): HE time "
                             f"predicted at {he / bound:.1f}x the bound")
        else:
            lines.append("no calibration for these parameters: for predicted times and sizes "
                         f"run `{calibrate_command(p.params)}` (or compile again with "
                         "--calibrate)")
        return "\n".join(lines)


def _op_name(op: str) -> str:
    return op.removesuffix("_inplace")


def predicted_ms(ops: dict[tuple[str, int], int], calibration: dict) -> float:
    ms = calibration["ms"]
    total = 0.0
    for (op, level), n in ops.items():
        total += n * ms.get(_op_name(op), {}).get(str(level), 0.0)
    return total


def _macs(step, kernel) -> tuple[int, int]:
    if step.op in ("conv2d", "conv2d_im2col"):
        co, ci, kh, kw = step.weight.shape
        _, ho, wo = kernel.out_layout.shape
        return co * ho * wo * ci * kh * kw, ci * kh * kw
    if step.op == "dense":
        m, n = step.weight.shape
        return m * n, n
    return 0, 0


def report(plan: Plan, calibration: dict | None = None) -> PlanReport:
    be = SymbolicBackend(plan.params)
    compiled = CompiledPlan(plan, be)
    counter = CountingBackend(be)
    cts = [be.encrypt(None) for _ in range(plan.input_layout.n_ct)]
    layers = []
    run_on = compiled.wrap(counter)  # under a key budget: composed rotations are counted
    # an output mask after a last kernel that cannot fold it is one more row (no step)
    steps = plan.steps + [PlanStep("output_mask")] * (len(compiled.kernels) - len(plan.steps))
    for k, step in zip(compiled.kernels, steps, strict=True):
        counter.reset()
        n_in = len(cts)
        cts = k.run(run_on, cts)
        ops = {(op, lvl): n for (op, lvl), n in counter.counts.items()}
        macs, width = _macs(step, k)
        layers.append(LayerReport(k.name, str(k.out_layout), k.in_level, k.out_level, ops,
                                  predicted_ms(ops, calibration) if calibration else None,
                                  macs, width, n_in))
    return PlanReport(plan, layers, compiled.spec.rotation_steps, calibration,
                      compiled.rotations)
