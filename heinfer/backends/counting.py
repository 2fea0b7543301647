"""A wrapper that counts (and times) every backend operation by kind and level.

Used for the compiler's report, the cost model and profiles: where does the time go, per layer and
per level. It forwards every call to the wrapped backend, so results are real CKKS.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

COUNTED = ("multiply_plain", "encode_scalar", "multiply", "square", "rotate", "rescale_inplace",
           "add_inplace", "add_plain_inplace", "mod_switch_to_inplace", "add", "copy")


class CountingBackend:
    def __init__(self, inner: Any):
        self._inner = inner
        self.counts: Counter[tuple[str, int]] = Counter()
        self.seconds: defaultdict[tuple[str, int], float] = defaultdict(float)
        self.step_counts: Counter[tuple[int, int]] = Counter()  # rotations by (step, level)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in COUNTED:
            return attr

        def counted(ct, *args, **kwargs):
            # encode_scalar(value, level, scale) has no ciphertext: its level is an argument
            level = args[0] if name == "encode_scalar" else self._inner.level(ct)
            t = time.perf_counter()
            out = attr(ct, *args, **kwargs)
            key = (name.removesuffix("_inplace"), level)
            self.seconds[key] += time.perf_counter() - t
            self.counts[key] += 1
            if name == "rotate":
                step = args[0] if args else kwargs["step"]
                self.step_counts[(step % self._inner.slots, level)] += 1
            return out

        return counted

    def reset(self) -> None:
        self.counts.clear()
        self.seconds.clear()
        self.step_counts.clear()

    def by_op(self) -> dict[str, tuple[int, float]]:
        agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for (op, _level), n in self.counts.items():
            agg[op][0] += n
            agg[op][1] += self.seconds[(op, _level)]
        return {op: (int(n), s) for op, (n, s) in agg.items()}

    def table(self) -> str:
        rows = [f"{'op':<16}{'level':>6}{'count':>8}{'ms total':>10}{'ms each':>9}"]
        for (op, level), n in sorted(self.counts.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            s = self.seconds[(op, level)] * 1e3
            rows.append(f"{op:<16}{level:>6}{n:>8}{s:>10.2f}{s / n:>9.3f}")
        return "\n".join(rows)
