"""Per-layer profile of a compiled plan: HE operation counts by level and time, on real CKKS.

This is where performance work starts (not a guess): which layer, which operation, which level.
"""

from __future__ import annotations

import time

from heinfer.backends.base import Ciphertext
from heinfer.backends.counting import CountingBackend
from heinfer.plan import CompiledPlan


def profile_layers(compiled: CompiledPlan, cts: list[Ciphertext]) -> list[dict]:
    """Run the plan once, layer by layer, counting every operation. Returns one row per layer:
    name, layout out, level in/out, ms, and {op@level: count}."""
    rows = []
    counter = CountingBackend(compiled.backend)
    run_on = compiled.wrap(counter)  # rotations by unkeyed steps count as their compositions
    for kernel in compiled.kernels:
        counter.reset()
        t = time.perf_counter()
        cts = kernel.run(run_on, cts)
        ms = (time.perf_counter() - t) * 1e3
        rows.append({
            "layer": kernel.name,
            "out_layout": str(kernel.out_layout),
            "level_in": kernel.in_level,
            "level_out": kernel.out_level,
            "ms": ms,
            "ops": {f"{op}@{lvl}": n for (op, lvl), n in sorted(counter.counts.items())},
            "op_ms": {f"{op}@{lvl}": 1e3 * s for (op, lvl), s in sorted(counter.seconds.items())},
        })
    return rows


def format_profile(rows: list[dict]) -> str:
    lines = [f"{'layer':<15}{'levels':>8}{'ms':>8}  rotations / mult_plain / other (by level)"]
    for r in rows:
        ops = r["ops"]
        rot = {k.split("@")[1]: v for k, v in ops.items() if k.startswith("rotate")}
        mp = {k.split("@")[1]: v for k, v in ops.items() if k.startswith("multiply_plain")}
        other = {k: v for k, v in ops.items()
                 if not k.startswith(("rotate", "multiply_plain", "add"))}
        lines.append(f"{r['layer']:<15}{r['level_in']:>4}->{r['level_out']:<3}{r['ms']:>8.1f}  "
                     f"rot {rot or '-'} mp {mp or '-'} {other or ''}")
    total = sum(r["ms"] for r in rows)
    lines.append(f"{'total':<15}{'':>8}{total:>8.1f}")
    return "\n".join(lines)
