"""Per-operation microbenchmarks on this machine: the cost model's only input.

    .venv/bin/python -m heinfer_packing.calibrate [--n 8192 --bits 36,29,29,29,29,29,36]

Measures rotate, multiply_plain, square (+relinearize), rescale, add and add_plain at every level
of one parameter set with real CKKS, and stores the medians (ms) in
`$HEINFER_CACHE/calibration/<n>-<bits>.json` (default `~/.cache/heinfer`). The cost model is
never fitted to the networks it predicts: only these per-operation numbers are used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from heinfer.backends import make_backend
from heinfer.params import CKKSParams
from heinfer.progress import Progress


def cache_dir() -> Path:
    return Path(os.environ.get("HEINFER_CACHE", Path.home() / ".cache" / "heinfer"))


def calibration_path(params: CKKSParams) -> Path:
    bits = "-".join(map(str, params.coeff_mod_bits))
    return cache_dir() / "calibration" / f"{params.poly_modulus_degree}-{bits}.json"


def calibrate_command(params: CKKSParams) -> str:
    """The exact command that calibrates this machine for `params` (what reports suggest)."""
    return (f"python -m heinfer_packing.calibrate --n {params.poly_modulus_degree} --bits "
            f"{','.join(map(str, params.coeff_mod_bits))} --scale-bits {params.scale_bits}")


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _measure_level(be, ct, x: np.ndarray, level: int, repeat: int) -> dict[str, float]:
    """Median ms of each operation on a ciphertext at `level` (copies subtracted)."""
    # weights are encoded at the scale of the prime the next rescale drops; at level 0 nothing
    # is rescaled any more, and the cost of a multiply does not depend on the scale
    pt = (be.encode(x, level, be.prime(level)) if level
          else be.encode(np.full(be.slots, 1000.0), 0, 2.0))
    ptc = be.encode(x, level, be.scale_of(ct))
    copy_ms = _median_ms(lambda: be.copy(ct), repeat)
    out = {
        "rotate": _median_ms(lambda: be.rotate(ct, 1), repeat),
        "multiply_plain": _median_ms(lambda: be.multiply_plain(ct, pt), repeat),
        "add": _median_ms(lambda: be.add(ct, ct), repeat),
        "add_plain": _median_ms(lambda: be.add_plain_inplace(be.copy(ct), ptc), repeat) - copy_ms,
        "copy": copy_ms,
        "serialize": _median_ms(lambda: be.ciphertext_to_bytes(ct), repeat),
    }
    if level > 0:
        prod = be.multiply_plain(ct, pt)
        out["square"] = _median_ms(lambda: be.square(ct), repeat)
        out["rescale"] = _median_ms(lambda: be.rescale_inplace(be.copy(prod)), repeat) - copy_ms
        out["mod_switch_to"] = _median_ms(
            lambda: be.mod_switch_to_inplace(be.copy(ct), level - 1), repeat) - copy_ms
    return {k: max(v, 1e-4) for k, v in out.items()}


def calibrate(params: CKKSParams, repeat: int = 9, progress: bool = False) -> dict:
    """Measure every operation at every level; `progress`: report the levels on stderr."""
    be = make_backend(params)
    keys = be.generate_keys([1])
    x = np.random.default_rng(0).normal(size=be.slots) * 0.1
    costs: dict[str, dict[str, float]] = {}
    ct = be.encrypt(x)
    with Progress(params.top_level + 1, f"calibrating {params.describe()}", unit="levels",
                  disable=not progress) as bar:
        for level in range(params.top_level, -1, -1):
            for op, ms in _measure_level(be, ct, x, level, repeat).items():
                costs.setdefault(op, {})[str(level)] = ms
            if level > 0:
                ct = be.multiply_plain(ct, be.encode(x, level, be.prime(level)))
                be.rescale_inplace(ct)
            bar.update()
    fresh = be.encrypt_to_bytes(x)
    costs["deserialize_fresh"] = {str(params.top_level): _median_ms(
        lambda: be.ciphertext_from_bytes(fresh), repeat)}
    sizes = {
        "galois_key_bytes": len(keys.galois_keys),
        "relin_key_bytes": len(keys.relin_keys),
        "seeded_ciphertext_bytes": len(be.encrypt_to_bytes(x)),
    }
    return {"params": params.model_dump(), "ms": costs, "sizes": sizes,
            "date": time.strftime("%Y-%m-%d %H:%M"), "repeat": repeat}


def load_or_calibrate(params: CKKSParams, refresh: bool = False,
                      progress: bool = False) -> dict:
    path = calibration_path(params)
    if path.exists() and not refresh:
        return json.loads(path.read_text())
    data = calibrate(params, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def parse_params(argv: list[str] | None = None) -> CKKSParams:
    """The parameters named on the command line (what `calibrate_command` writes)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--bits", default="36,29,29,29,29,29,36")
    ap.add_argument("--scale-bits", type=int, default=29)
    args = ap.parse_args(argv)
    return CKKSParams(poly_modulus_degree=args.n,
                      coeff_mod_bits=[int(b) for b in args.bits.split(",")],
                      scale_bits=args.scale_bits)


def main(argv: list[str] | None = None) -> int:
    params = parse_params(argv)
    data = load_or_calibrate(params, refresh=True, progress=True)
    print(f"calibration for {params.describe()} -> {calibration_path(params)}")
    for op, by_level in data["ms"].items():
        print(f"  {op:<15}" + "  ".join(f"L{lv}: {ms:.3f}" for lv, ms in by_level.items()))
    print(f"  sizes: {data['sizes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
