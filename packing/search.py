"""Choose a plan by objective: candidate packings priced by the calibrated cost model.

Candidates today: the first convolution's input layout (client-arranged im2col windows or one
replicated ciphertext), the last layer's rescale (fast or precise), the mode (one image per
request, or a batch in the slots for throughput) and, for plans that rotate, the Galois key
budget (a key per step, 3/4 and 1/2 of the steps, the power-of-two keys, and what a key-size or
key-count limit allows; `packing/keys.py`). Each candidate is lowered, its operations are counted
on the symbolic backend (composed rotations included) and priced with this machine's
per-operation calibration; the objective picks among those that respect the limits. The table
of all candidates is the trade-off curve (time against key size, upload and memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from heinfer.errors import ModelFormatError
from heinfer.plan import Plan
from heinfer.progress import Progress
from heinfer_packing.calibrate import load_or_calibrate
from heinfer_packing.keys import budget_variants
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import Model
from heinfer_packing.report import PlanReport, report

OBJECTIVES = ("latency", "throughput", "keys", "upload", "memory")


@dataclass
class Candidate:
    name: str
    plan: Plan
    report: PlanReport

    @property
    def images(self) -> int:
        return self.plan.params.slots if self.plan.metadata.get("mode") == "batch" else 1

    @property
    def latency_ms(self) -> float:
        return self.report.predicted_ms

    @property
    def throughput(self) -> float:
        """Images per second for one worker process."""
        return self.images / (self.latency_ms / 1e3)

    @property
    def key_bytes(self) -> int:
        return self.report.key_bytes()

    @property
    def galois_keys(self) -> int:
        return len(self.report.rotation_steps)

    @property
    def upload_per_image(self) -> float:
        return self.report.upload_bytes() / self.images

    @property
    def memory_bytes(self) -> int:
        """Estimated server memory: pre-encoded plaintexts plus the widest layer's ciphertexts
        (inputs and outputs alive together), at full size."""
        p = self.plan.params
        poly = p.poly_modulus_degree * 8
        plaintexts = sum(layer.count("multiply_plain") for layer in self.report.layers)
        if self.images > 1:
            plaintexts = 0  # weights are encoded on the fly in throughput mode
        widest = max(self.plan.input_layout.n_ct, *[
            _n_ct(layer.out_layout) for layer in self.report.layers])
        return (plaintexts * poly * p.data_primes
                + 2 * widest * 2 * poly * p.data_primes)


def _n_ct(layout_text: str) -> int:
    # BatchLayout prints "batch[5x13x13 ciphertexts ...]"; others hold few ciphertexts
    if layout_text.startswith("batch["):
        dims = layout_text[6:].split(" ")[0].split("x")
        n = 1
        for d in dims:
            n *= int(d)
        return n
    return 1


def candidates(model: Model, calibrate: bool = True, max_keys: int | None = None,
               max_key_mb: float | None = None, progress: bool = False) -> list[Candidate]:
    """Every packing, and for each one that rotates its key-budget variants (named
    "PACKING, N keys" or "PACKING, pow2 keys"); `max_keys` and `max_key_mb` add the variant
    with as many keys as they allow. `progress`: report the packings on stderr."""
    out = []
    has_conv = any(layer.op == "conv2d" for layer in model.layers[:1])
    # (first_conv, precise, batch); the batch layout ignores the first-conv choice: one variant
    packings = [(fc, precise, batch)
                for fc in (("im2col", "rotation") if has_conv else ("im2col",))
                for precise in (False, True) for batch in (False, True)
                if not (batch and (fc != "im2col" or precise))]
    with Progress(len(packings), f"planning and pricing {model.name}", unit="packings",
                  disable=not progress) as bar:
        for first_conv, precise, batch in packings:
            plan = lower(model, first_conv=first_conv, final_rescale=True if precise else None,
                         batch=batch)
            cal = load_or_calibrate(plan.params, progress=progress) if calibrate else None
            name = ("batch" if batch else first_conv) + (" precise" if precise else "")
            out.append(Candidate(name, plan, report(plan, cal)))
            for label, variant in budget_variants(plan, cal, max_keys, max_key_mb):
                out.append(Candidate(f"{name}, {label}", variant, report(variant, cal)))
            bar.update()
    return out


def choose(cands: list[Candidate], objective: str, max_key_mb: float | None = None,
           max_upload_kb: float | None = None, max_memory_gb: float | None = None,
           precise: bool = False, max_latency_ms: float | None = None,
           max_keys: int | None = None) -> Candidate:
    if objective not in OBJECTIVES:
        raise ModelFormatError(f"objective {objective!r}: choose one of {OBJECTIVES}")
    ok = [c for c in cands
          if (max_key_mb is None or c.key_bytes <= max_key_mb * 1e6)
          and (max_keys is None or c.galois_keys <= max_keys)
          and (max_upload_kb is None or c.upload_per_image <= max_upload_kb * 1e3)
          and (max_memory_gb is None or c.memory_bytes <= max_memory_gb * 1e9)
          and (max_latency_ms is None or c.latency_ms <= max_latency_ms)
          and (not precise or "precise" in c.name)]
    if not ok:
        raise ModelFormatError("no candidate plan meets the limits; relax them:\n"
                               + trade_off_table(cands))
    key = {"latency": lambda c: c.latency_ms, "throughput": lambda c: -c.throughput,
           "keys": lambda c: (c.key_bytes, c.latency_ms),
           "upload": lambda c: (c.upload_per_image, c.latency_ms),
           "memory": lambda c: (c.memory_bytes, c.latency_ms)}[objective]
    return min(ok, key=key)


def trade_off_table(cands: list[Candidate], chosen: Candidate | None = None) -> str:
    lines = ["| candidate | latency ms | images/s (1 worker) | Galois keys | keys MB "
             "| upload KB/image | memory GB (est.) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(cands, key=lambda c: c.latency_ms):
        mark = " (chosen)" if c is chosen else ""
        lines.append(f"| {c.name}{mark} | {c.latency_ms:.1f} | {c.throughput:.1f} "
                     f"| {c.galois_keys} | {c.key_bytes / 1e6:.1f} "
                     f"| {c.upload_per_image / 1e3:.1f} "
                     f"| {c.memory_bytes / 1e9:.2f} |")
    return "\n".join(lines)
