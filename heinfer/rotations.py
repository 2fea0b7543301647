"""Galois key budgets: a few keyed rotation steps, every other step composed from them.

Each Galois key costs megabytes (about 1.5 MB seeded at n=8192, 15.6 MB at n=16384 with 16
primes), and a plan needs one per distinct rotation step its kernels use. With a budget, a plan
keys only a set K of steps and runs a rotation by a step s outside K as the shortest sequence of
rotations by steps of K that adds up to s modulo the slot count (rotations compose:
rot(rot(x, a), b) = rot(x, a + b)). Kernels do not change: `ComposedRotations` wraps the backend
they run on and replaces each `rotate` by its route.

- `shortest_routes`: breadth-first search over the steps modulo `slots` (bitsets, one level per
  extra rotation), at most `max_len` rotations per route.
- `choose_keys`: K for at most `max_keys` keys, minimising the weighted number of rotations,
  sum over used steps of weight(s) x route length(s): greedy (add the candidate that lowers it
  most, a step that cannot be reached yet counting as a long route), then swaps of one key for
  another while that helps; when that leaves a step unreachable (tight budgets), the greedy is
  rerun from every candidate as the first key and the best result kept. Candidates: the used
  steps and the power-of-two multiples (both signs) of their greatest common divisor with the
  slot count, which reach every used step.
- `RotationKeys`: the chosen keys and routes of one plan, precomputed when it is built.

See docs/COMPILER.md, "Galois key budget".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from heinfer.backends.base import Ciphertext
from heinfer.errors import KeyBudgetError


def max_route_len(slots: int) -> int:
    """Longest composition allowed: enough for any step over the power-of-two keys (binary
    digits of a step below `slots`); each extra rotation adds its key-switching noise."""
    return max(1, (slots - 1).bit_length())


def _bfs(keys: Iterable[int], slots: int, targets: Iterable[int],
         max_len: int) -> tuple[dict[int, int], list[int]]:
    """Distances (in rotations by keyed steps) from 0 to each reachable target, and the BFS
    levels as bitsets (bit s of levels[d] set: step s needs exactly d rotations)."""
    keys = sorted({k % slots for k in keys} - {0})
    mask = (1 << slots) - 1
    remaining = {t % slots for t in targets} - {0}
    dist: dict[int, int] = {}
    seen = frontier = 1
    levels = [1]
    for d in range(1, max_len + 1):
        if not remaining or not keys:
            break
        new = 0
        for k in keys:  # bitset rotation by k: every step of the frontier plus k
            new |= ((frontier << k) | (frontier >> (slots - k))) & mask
        new &= ~seen
        if not new:
            break
        seen |= new
        frontier = new
        levels.append(new)
        for t in [t for t in remaining if new >> t & 1]:
            dist[t] = d
            remaining.discard(t)
    return dist, levels


def shortest_routes(keys: Iterable[int], steps: Iterable[int], slots: int,
                    max_len: int | None = None) -> dict[int, tuple[int, ...]]:
    """For each step (mod slots, 0 left out), the shortest tuple of keyed steps summing to it;
    steps with no route of at most `max_len` rotations are left out."""
    keys = sorted({k % slots for k in keys} - {0})
    max_len = max_len or max_route_len(slots)
    dist, levels = _bfs(keys, slots, steps, max_len)
    routes: dict[int, tuple[int, ...]] = {}
    for s, d in sorted(dist.items()):
        route, cur = [], s
        for j in range(d - 1, -1, -1):  # back down the levels: cur - k was reached at level j
            k = next(k for k in reversed(keys) if levels[j] >> ((cur - k) % slots) & 1)
            route.append(k)
            cur = (cur - k) % slots
        routes[s] = tuple(route)
    return routes


def _cost(keys: Iterable[int], weights: Mapping[int, float], slots: int, max_len: int) -> float:
    dist, _ = _bfs(keys, slots, weights, max_len)
    unreachable = 2 * (max_len + 1)
    return sum(w * dist.get(s, unreachable) for s, w in weights.items())


def _candidates(steps: Iterable[int], slots: int) -> list[int]:
    steps = sorted({s % slots for s in steps} - {0})
    g = math.gcd(slots, *steps)
    pow2 = [g << i for i in range((slots // g).bit_length()) if g << i < slots]
    return sorted(set(steps) | set(pow2) | {slots - p for p in pow2})


def power_of_two_keys(steps: Iterable[int], slots: int) -> list[int]:
    """The power-of-two multiples of the steps' greatest common divisor that their binary
    decompositions use: a key set that reaches every used step."""
    steps = sorted({s % slots for s in steps} - {0})
    if not steps:
        return []
    g = math.gcd(slots, *steps)
    return sorted({g << i for s in steps for i in range((s // g).bit_length())
                   if (s // g) >> i & 1})


def _greedy(w: Mapping[int, float], pool: list[int], slots: int, max_keys: int, max_len: int,
            chosen: list[int]) -> tuple[float, list[int]]:
    """Add the key that lowers the cost most until the budget is full or nothing helps."""
    chosen = list(chosen)
    cost = _cost(chosen, w, slots, max_len)
    while len(chosen) < max_keys:
        best = min(((_cost(chosen + [c], w, slots, max_len), c) for c in pool
                    if c not in chosen), default=None)
        if best is None or best[0] >= cost:
            break
        cost = best[0]
        chosen.append(best[1])
    return cost, chosen


def _improve(cost: float, chosen: list[int], w: Mapping[int, float], pool: list[int],
             slots: int, max_len: int, rounds: int) -> tuple[float, list[int]]:
    """Swap one key for another candidate while that lowers the cost."""
    chosen = list(chosen)
    for _ in range(rounds):
        improved = False
        for i in range(len(chosen)):
            rest = chosen[:i] + chosen[i + 1:]
            best = min(((_cost(rest + [c], w, slots, max_len), c) for c in pool
                        if c not in chosen), default=None)
            if best is not None and best[0] < cost - 1e-12:
                cost, chosen[i], improved = best[0], best[1], True
        if not improved:
            break
    return cost, chosen


def choose_keys(weights: Mapping[int, float], slots: int, max_keys: int,
                max_len: int | None = None, swap_rounds: int = 2) -> list[int]:
    """At most `max_keys` steps to key so that sum(weight(s) x rotations to compose s) is small.
    `weights`: per used step, how much its rotations cost (count, or calibrated time). Raises
    KeyBudgetError when the budget cannot reach every used step."""
    w: dict[int, float] = {}
    for s, v in weights.items():
        if s % slots:
            w[s % slots] = w.get(s % slots, 0.0) + float(v)
    if len(w) <= max_keys:
        return sorted(w)
    max_len = max_len or max_route_len(slots)
    if max_keys < 1:
        raise KeyBudgetError(f"a budget of {max_keys} Galois keys cannot run a plan that "
                             f"rotates by {len(w)} steps {sorted(w)}: allow at least one key")
    pool = _candidates(w, slots)
    cost, chosen = _improve(*_greedy(w, pool, slots, max_keys, max_len, []), w, pool, slots,
                            max_len, swap_rounds)
    if len(shortest_routes(chosen, w, slots, max_len)) < len(w):
        # a tight budget: greedy from every first key, keep the best, then swaps
        cost, chosen = min(_greedy(w, pool, slots, max_keys, max_len, [c]) for c in pool)
        cost, chosen = _improve(cost, chosen, w, pool, slots, max_len, swap_rounds)
    missing = sorted(set(w) - set(shortest_routes(chosen, w, slots, max_len)))
    if missing:
        raise KeyBudgetError(
            f"{max_keys} Galois key(s) cannot compose rotation step(s) {missing} in at most "
            f"{max_len} rotations (the plan uses steps {sorted(w)}): raise the key budget")
    return sorted(chosen)


@dataclass(frozen=True)
class RotationKeys:
    """The keyed steps of one plan and, for each step its kernels use, the keyed steps whose
    rotations compose it (a keyed step's route is itself)."""

    slots: int
    keys: tuple[int, ...]
    routes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    max_keys: int | None = None

    @classmethod
    def build(cls, keys: Iterable[int], used: Iterable[int], slots: int,
              max_keys: int | None = None) -> RotationKeys:
        used = sorted({s % slots for s in used} - {0})
        keys = sorted({k % slots for k in keys} - {0})
        routes = shortest_routes(keys, used, slots)
        missing = [s for s in used if s not in routes]
        if missing:
            raise KeyBudgetError(
                f"Galois keys for steps {keys} cannot compose rotation step(s) {missing} in at "
                f"most {max_route_len(slots)} rotations (the plan uses steps {used})")
        needed = sorted({k for r in routes.values() for k in r})  # keys no route uses: dropped
        if max_keys is not None and len(needed) > max_keys:
            raise KeyBudgetError(f"key set {needed} has {len(needed)} Galois keys, the budget "
                                 f"allows {max_keys}")
        return cls(slots, tuple(needed), routes, max_keys)

    @property
    def composed(self) -> dict[int, tuple[int, ...]]:
        """The used steps that have no key of their own, with their routes."""
        return {s: r for s, r in self.routes.items() if len(r) > 1}

    def wrap(self, backend: Any) -> Any:
        """`backend` itself when every used step has a key, else a composing wrapper."""
        return ComposedRotations(backend, self.composed) if self.composed else backend

    def describe(self) -> str:
        parts = ", ".join(f"{s}={'+'.join(map(str, r))}" for s, r in self.composed.items())
        return (f"{len(self.keys)} Galois keys {list(self.keys)}"
                + (f"; composed: {parts}" if parts else ""))


class ComposedRotations:
    """Backend wrapper: a rotation by a step without a key runs as its route of keyed
    rotations on the wrapped backend; everything else is forwarded unchanged. Wrap outside a
    CountingBackend so that the counts include the composed rotations."""

    def __init__(self, inner: Any, routes: Mapping[int, tuple[int, ...]]):
        self._inner = inner
        self._routes = dict(routes)
        self._slots = inner.slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def rotate(self, a: Ciphertext, step: int) -> Ciphertext:
        route = self._routes.get(step % self._slots)
        if route is None:
            return self._inner.rotate(a, step)
        for k in route:
            a = self._inner.rotate(a, k)
        return a
