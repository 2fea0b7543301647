"""What model privacy costs (issue 17): masking, re-randomizing and flooding, per zoo model.

    .venv/bin/python -m bench.privacy_bench [--models fmnist-cryptonets ...] [--images 4]
        [--bits 30] [--precise-models fmnist-cryptonets] [--quick]

For each model, in the same run and on the same test images, the curious client
(`heinfer_models.curious`) decrypts every output slot of four server-side variants:

- `bare`: the plan as before issue 17 (no output mask),
- `masked`: only the answer slots (folded into the last layer: no level),
- `masked, level`: the mask as one `OutputMask` level instead (`lower(output_mask="level")`,
  `heinfer-compile --output-mask level`): one more prime, no extra multiplies in the last layer,
- `rerandomized`: masked plus a fresh encryption of zero under the client's public key,
- `sanitized`: rerandomized plus flooding for `--bits` of statistical security, with the noise
  measured on two other test images (`packing.privacy.sanitize_plan`); a plan whose last level
  cannot hold the flooding is reported as such,
- `sanitized, 50-bit scale` (models in `--precise-models`): the same on a precise plan with a
  50-bit scale, n=16384, primes [60, 50 x (depth + 1), 60]: what sanitizing costs when the
  logits must stay usable.

Reports server time per image (median, ratio to `bare`), levels used, max logit error against
numpy and the largest value in a non-answer slot. Writes bench/results/privacy_bench.json.
"""

from __future__ import annotations

import argparse
import statistics

from bench.results_io import save_results
from heinfer.errors import HeinferError
from heinfer.params import CKKSParams
from heinfer_models import fashion_mnist
from heinfer_models.curious import probe, zoo_plan
from heinfer_packing.privacy import sanitize_plan

DEFAULT_MODELS = ["fmnist-cryptonets", "fmnist-tenseal-tutorial", "fmnist-polyconv-1",
                  "fmnist-conformal-1", "fmnist-alexnet"]


def row(name: str, variant: str, p, scale: float) -> dict:
    return {"model": name, "variant": variant,
            "server_ms": 1e3 * statistics.median(p.server_s),
            "levels": p.levels_used,
            "max_logit_error": p.max_answer_err * scale,
            "max_other_slot": p.max_other * scale}


def precise_params(depth: int) -> CKKSParams:
    return CKKSParams(poly_modulus_degree=16384, coeff_mod_bits=[60] + [50] * depth + [60],
                      scale_bits=50)


def sanitized_row(name: str, variant: str, plan, model, probe_xs, calib, bits: int) -> dict:
    try:
        sane = sanitize_plan(plan, model, calib, stat_bits=bits)
    except HeinferError as e:
        return {"model": name, "variant": variant, "error": str(e)}
    r = row(name, variant, probe(sane, model, probe_xs), plan.output_scale)
    r["flood_sigma"] = sane.flood_spec().sigma * plan.output_scale
    r["noise_rms"] = sane.flood_spec().noise_rms * plan.output_scale
    r["params"] = plan.params.describe()
    return r


def bench_model(name: str, images: int, bits: int, precise: bool) -> list[dict]:
    model, plan, _ = zoo_plan(name)
    test, _ = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(test[: images + 2], model.input_shape)
    probe_xs, calib = xs[:images], xs[images:]
    scale = plan.output_scale
    rows = [row(name, "bare", probe(plan, model, probe_xs, mask_output=False), scale),
            row(name, "masked", probe(plan, model, probe_xs), scale),
            row(name, "rerandomized", probe(plan, model, probe_xs, rerandomize=True), scale)]
    if hasattr(model, "layers"):  # conformal plans fold their mask (no level variant)
        from heinfer_packing.lower import lower

        try:
            level = lower(model, output_mask="level")
        except HeinferError as e:
            rows.append({"model": name, "variant": "masked, level", "error": str(e)})
        else:
            rows.append(row(name, "masked, level", probe(level, model, probe_xs), scale))
    rows.append(sanitized_row(name, f"sanitized {bits} bits", plan, model, probe_xs, calib,
                              bits))
    if precise:
        from heinfer_packing.lower import lower

        exact = lower(model, precise_params(plan.params.depth + 1))
        rows.append(sanitized_row(name, f"sanitized {bits}, 50-bit", exact, model, probe_xs,
                                  calib, bits))
    base = rows[0]["server_ms"]
    for r in rows:
        if "server_ms" in r:
            r["time_ratio"] = r["server_ms"] / base
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<24}{'variant':<24}{'server ms':>10}{'ratio':>7}{'levels':>7}"
             f"{'max logit err':>15}{'max other slot':>16}{'flood sigma':>13}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<24}{r['variant']:<24}  refused: {r['error']}")
            continue
        sigma = f"{r['flood_sigma']:.3g}" if "flood_sigma" in r else "-"
        lines.append(f"{r['model']:<24}{r['variant']:<24}{r['server_ms']:>10.1f}"
                     f"{r['time_ratio']:>7.2f}{r['levels']:>7}{r['max_logit_error']:>15.3g}"
                     f"{r['max_other_slot']:>16.3g}{sigma:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--bits", type=int, default=30)
    ap.add_argument("--precise-models", nargs="*", default=["fmnist-cryptonets"],
                    help="also sanitize these on a precise 50-bit-scale plan (n=16384)")
    ap.add_argument("--quick", action="store_true", help="cryptonets only, 2 images")
    args = ap.parse_args(argv)
    models, images = (["fmnist-cryptonets"], 2) if args.quick else (args.models, args.images)
    rows = []
    for name in models:
        rows += bench_model(name, images, args.bits, name in args.precise_models)
        print(table(rows), flush=True)
    save_results("privacy_bench", {"images": images, "bits": args.bits, "rows": rows},
                 quick=args.quick)


if __name__ == "__main__":
    main()
