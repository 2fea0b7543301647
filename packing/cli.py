"""`heinfer-compile`: model in, plan and report out.

    heinfer-compile fmnist-cryptonets --out plans/fmnist-cryptonets [--first-conv rotation]
    heinfer-compile path/to/model_dir --out plans/mine
    heinfer-compile model.onnx --calib-fmnist 512 --degree 2 --out plans/mine
    heinfer-compile model.pt --input-shape 3,64,64 --calib-images photos/ --out plans/mine
    heinfer-compile fmnist-cryptonets --objective latency --max-key-mb 20
    heinfer-compile alexnet-imagenet-224   # plan and price a topology (random weights)
    heinfer-compile fmnist-cryptonets --first-conv rotation --max-keys 8   # compose the rest

Prints the report (per-layer layout, HE operation counts by level, predicted time when this
machine is calibrated) and saves it next to the plan as `PREFIX.report.txt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from heinfer.errors import ModelFormatError
from heinfer.names import MODEL_NAME_RE, is_model_name, to_model_name
from heinfer.plan import Plan
from heinfer.progress import Phase
from heinfer_packing import calib_data
from heinfer_packing.calibrate import calibration_path, load_or_calibrate
from heinfer_packing.checking import Setting, check_and_retry, check_inputs, measure_ranges
from heinfer_packing.keys import apply_key_budget
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import load_model
from heinfer_packing.report import report
from heinfer_packing.rewrites import format_records, rewrite
from heinfer_packing.search import OBJECTIVES, candidates, choose, trade_off_table


def _floats(text: str | None) -> list[float] | None:
    return None if text is None else [float(v) for v in text.split(",")]


def _load(source: str, input_shape: str | None = None):
    path = Path(source)
    if path.suffix == ".onnx":
        from heinfer_packing.onnx_import import load_onnx

        return load_onnx(path)
    if path.suffix in (".pt", ".pth", ".pt2"):
        from heinfer_packing.torch_import import load_torch_file

        shape = None if input_shape is None else tuple(int(v) for v in input_shape.split(","))
        return load_torch_file(path, shape)
    if (path / "model.json").exists():
        return load_model(path)
    from heinfer_models import alexnet, zoo

    if source in alexnet.TOPOLOGIES:  # a topology to plan and price, random weights
        return alexnet.topology(source)

    return zoo.load(source)


def plan_name(name: str, chosen: str | None) -> str:
    """The name the plan is served under: `--name` as given (checked), else the model's own
    name made acceptable (netB.onnx -> netb), said aloud when changed."""
    import sys

    if chosen is not None:
        if not is_model_name(chosen):
            raise ModelFormatError(f"--name {chosen!r}: a model name must match "
                                   f"{MODEL_NAME_RE.pattern} (lowercase letters, digits, '.', "
                                   "'_', '-'; at most 64 characters)")
        return chosen
    if is_model_name(name):
        return name
    fixed = to_model_name(name)
    if not fixed:
        raise ModelFormatError(f"model name {name!r} has no character a served name can use: "
                               "give one with --name (e.g. --name my-model)")
    print(f"heinfer-compile: plan named {fixed!r} (model name {name!r}: served names are "
          f"lowercase, {MODEL_NAME_RE.pattern}); choose another with --name", file=sys.stderr)
    return fixed


def _compile_conformal(net, args) -> int:
    from heinfer_models import fashion_mnist
    from heinfer_packing.conformal import lower_conformal

    calib = None
    if args.calib_fmnist:
        images, _ = fashion_mnist.load("train")
        calib = fashion_mnist.normalize(images[: args.calib_fmnist])
    plan, col = lower_conformal(net, net.metadata.get("name", "conformal"),
                                net.metadata.get("labels"), calib_x=calib)
    cal = load_or_calibrate(plan.params, progress=not args.no_progress) if (
        args.calibrate or calibration_path(plan.params).exists()) else None
    if args.max_keys is not None or args.max_key_mb is not None:
        plan = apply_key_budget(plan, args.max_keys, calibration=cal, max_key_mb=args.max_key_mb)
    plan = plan.for_backend(args.backend)
    check_text = "plan check: not run (--check none); servers refuse this plan unless forced"
    if args.check != "none":
        from heinfer.check import check_plan, with_record
        from heinfer.errors import PlanCheckError

        xs, source = check_inputs(net, calib)
        rec = check_plan(plan, xs[: max(8, args.check_inputs)], net.forward,
                         f"the conformal network in plaintext, {source}", method=args.check,
                         max_error=args.max_error, agreement_xs=xs)
        if not rec.passed:
            raise PlanCheckError(f"the plan fails its check, nothing written:\n{rec.summary()}")
        plan, check_text = with_record(plan, rec), rec.summary()
    text = (f"conformal network, {len(net.blocks)} blocks, collapsed: M {col.M.shape}, "
            f"R {col.R.shape} ({col.factor} factor), c0 {col.c0:.4g}\n\n"
            + report(plan, cal).to_text())
    text += "\n" + check_text
    print(text)
    if args.out:
        json_path = plan.save(args.out)
        Path(f"{args.out}.report.txt").write_text(text + "\n")
        print(f"\nwrote {json_path}, {args.out}.plan.npz and {args.out}.report.txt")
    return 0


def _sanitize(plan, model, calib_x, args):
    from heinfer.errors import ModelFormatError
    from heinfer_packing.privacy import flooded_error, sanitize_plan

    if calib_x is None or len(calib_x) == 0:
        raise ModelFormatError("--sanitize measures the plan's noise on calibration images: "
                               "add --calib-fmnist N or --calib-npz FILE")
    plan = sanitize_plan(plan, model, calib_x[:4], args.sanitize, args.sanitize_queries)
    flood = plan.flood_spec()
    print(f"sanitized outputs: noise rms {flood.noise_rms:.3g} on {flood.images} images, "
          f"flooding std {flood.sigma:.3g} per slot ({flood.stat_bits} bits, "
          f"{flood.queries} decryption(s)): logit error about {flooded_error(plan):.3g}\n")
    return plan


def _calibration(plan: Plan, args, show: bool = False) -> dict | None:
    if args.calibrate or calibration_path(plan.params).exists():
        return load_or_calibrate(plan.params, progress=show)
    return None


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="heinfer-compile", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model directory (model.json + weights.npz), zoo name, "
                    "model.onnx, or a PyTorch model.pt/.pth (torch.save) or .pt2 (torch.export)")
    ap.add_argument("--out", help="plan path prefix (writes PREFIX.plan.json/.npz/.report.txt)")
    ap.add_argument("--name", help="model name in the plan, served under it: lowercase letters, "
                    "digits, '.', '_', '-' (default: the model's name, lowercased and with "
                    "other characters made '-')")
    ap.add_argument("--first-conv", default="im2col", choices=["im2col", "rotation"])
    ap.add_argument("--calibrate", action="store_true",
                    help="measure per-operation costs on this machine if not cached")
    ap.add_argument("--calib-fmnist", type=int, default=0, metavar="N",
                    help="use N Fashion-MNIST training images (labelled) as calibration data")
    ap.add_argument("--calib-npz", help="calibration data: npz with x (N, ...) and optional y")
    ap.add_argument("--calib-images", metavar="DIR",
                    help="calibration images (Pillow: png, jpg, ...) resized to the input; "
                         "class sub-folders give labels")
    ap.add_argument("--calib-limit", type=int, default=0, metavar="N",
                    help="use at most N of the --calib-images")
    ap.add_argument("--image-mean", help="per-channel mean subtracted from [0, 1] images")
    ap.add_argument("--image-std", help="per-channel std the images are divided by")
    ap.add_argument("--input-shape", metavar="C,H,W",
                    help="input shape of a torch.save'd module (.pt/.pth)")
    ap.add_argument("--degree", type=int, default=2, help="degree of fitted activations")
    ap.add_argument("--compact", choices=["auto", "always", "interleaved", "never"],
                    default="auto",
                    help="convert sparse pooled maps that feed a convolution to dense channel "
                         "blocks, or interleaved channels (one level each); auto: the cheapest "
                         "priced plan among none, blocks and interleaved")
    ap.add_argument("--scale-bits", type=int, metavar="B",
                    help="CKKS scale 2^B (data primes of B bits); default: the model's "
                         "metadata scale_bits, else 29")
    ap.add_argument("--output-mask", choices=["fold", "level", "auto"], default="fold",
                    help="only the answer slots leave the server: folded into the last layer "
                         "(default, no level; one multiply per input slot), one mask level "
                         "(one more prime; cheaper when the last layer's inputs are dense), or "
                         "the cheaper of the two (priced like --compact auto)")
    ap.add_argument("--precise", action="store_true",
                    help="keep the last layer's rescale: ~10x smaller output error, one more "
                         "prime (slower); default: the last dense layer skips it")
    ap.add_argument("--objective", choices=OBJECTIVES,
                    help="price every candidate plan with this machine's calibration and pick "
                         "by objective (prints the trade-off table); without it, the plan "
                         "given by --first-conv/--precise")
    ap.add_argument("--max-key-mb", type=float,
                    help="limit on evaluation keys (seeded MB): with --objective, candidates "
                         "with fewer Galois keys are added and the limit filters them; "
                         "without, the plan keeps as many keys as fit (needs a calibration)")
    ap.add_argument("--max-keys", type=int, metavar="N",
                    help="at most N Galois keys: rotations by other steps are composed from "
                         "keyed ones at run time (with --objective: a limit and a candidate)")
    ap.add_argument("--check", choices=["auto", "ckks", "modelled", "none"], default="auto",
                    help="check the plan before writing it (heinfer.check): a real CKKS run "
                         "on the check inputs against plaintext (ckks), modelled CKKS errors "
                         "(modelled), auto: real unless it would take over a minute; none: "
                         "write it unchecked (servers refuse it unless forced)")
    ap.add_argument("--check-inputs", type=int, default=8, metavar="N",
                    help="inputs the check runs on (at least 8; calibration data first)")
    ap.add_argument("--max-error", type=float,
                    help="largest output error the check accepts (default 5%% of the largest "
                         "|output| on the check inputs)")
    ap.add_argument("--max-upload-kb", type=float, help="limit per image for --objective")
    ap.add_argument("--max-memory-gb", type=float, help="limit for --objective (estimated)")
    ap.add_argument("--max-latency-ms", type=float, help="limit for --objective")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress on stderr (bar on a terminal, plain lines when piped)")
    ap.add_argument("--sanitize", type=int, metavar="BITS",
                    help="sanitized outputs: the server re-randomizes and floods every output "
                         "for BITS bits of statistical security (30 is the documented default; "
                         "the noise is measured on 4 calibration images: needs --calib-fmnist "
                         "or --calib-npz)")
    ap.add_argument("--sanitize-queries", type=int, default=1, metavar="T",
                    help="decryptions per key the flooding bound covers (adds log2(T)/2 bits)")
    ap.add_argument("--backend", choices=["tenseal", "pyfhel"], default="tenseal",
                    help="the backend the server evaluates the plan with (the spec names it; "
                         "clients use its SEAL version): pyfhel = SEAL 4.1, what the browser "
                         "page (node-seal) speaks; default tenseal (SEAL 4.3)")
    args = ap.parse_args(argv)
    show = not args.no_progress
    if args.name is not None:  # a wrong --name fails before any work
        plan_name(args.name, args.name)
    imported = Path(args.model).suffix in (".onnx", ".pt", ".pth", ".pt2")
    with Phase(f"importing {args.model}", disable=not (show and imported)):  # 30 s at 3x224
        model = _load(args.model, args.input_shape)
    from heinfer_packing.conformal import ConformalNet

    if isinstance(model, ConformalNet):
        model.metadata["name"] = plan_name(model.metadata.get("name", "conformal"), args.name)
        return _compile_conformal(model, args)
    model.name = plan_name(model.name, args.name)
    for note in model.metadata.get("import_notes", []):
        print(f"import note: {note}")
    calib_x = calib_y = None
    if args.calib_npz:
        calib_x, calib_y = calib_data.from_npz(args.calib_npz, model.input_shape)
    elif args.calib_images:
        calib_x, calib_y = calib_data.from_images(
            args.calib_images, model.input_shape, args.calib_limit or None,
            _floats(args.image_mean), _floats(args.image_std))
    elif args.calib_fmnist:
        calib_x, calib_y = calib_data.from_fmnist(args.calib_fmnist, model.input_shape)
    with Phase(f"rewriting {model.name} for HE" + (f" (fitting on {len(calib_x)} images)"
                                                   if calib_x is not None else ""),
               disable=not show):
        model, records = rewrite(model, calib_x, calib_y, degree=args.degree)
    rewrites_text = format_records(records)
    print(f"HE-friendly rewrites of {model.name}:\n{rewrites_text}\n")
    xs, source = check_inputs(model, calib_x)
    if calib_x is not None and not model.metadata.get("max_abs"):
        # range analysis on the calibration data: sizes the first prime and the headroom
        model.metadata["max_abs"] = measure_ranges(model, calib_x[:256])
    current = Setting(args.precise, args.scale_bits)
    cands, table_text = None, []
    if args.objective:
        cands = candidates(model, max_keys=args.max_keys, max_key_mb=args.max_key_mb,
                           progress=show)

    def make_plan(setting: Setting) -> Plan:
        if cands is not None and setting.scale_bits == args.scale_bits:
            best = choose(cands, args.objective, args.max_key_mb, args.max_upload_kb,
                          args.max_memory_gb, precise=setting.precise,
                          max_latency_ms=args.max_latency_ms, max_keys=args.max_keys)
            if setting == current:
                table = trade_off_table(cands, best)
                print(f"candidates, objective {args.objective}:\n{table}\n")
                table_text.append(f"\n\nobjective {args.objective}:\n{table}")
            return best.plan
        with Phase(f"planning {model.name}" + (f" ({setting.flags()})" if setting != current
                                               else ""), disable=not show):
            plan = lower(model, first_conv=args.first_conv,
                         final_rescale=True if setting.precise else None,
                         scale_bits=setting.scale_bits, output_mask=args.output_mask,
                         compact={"auto": None, "always": True, "interleaved": "interleaved",
                                  "never": False}[args.compact])
        if not args.objective and (args.max_keys is not None or args.max_key_mb is not None):
            plan = apply_key_budget(plan, args.max_keys,
                                    calibration=_calibration(plan, args, show),
                                    max_key_mb=args.max_key_mb)
        return plan.for_backend(args.backend)  # checked on the backend that will serve it

    plan = make_plan(current)
    rewrites_text += "".join(table_text)
    check_text = "plan check: not run (--check none); servers refuse this plan unless forced"
    if model.metadata.get("untrained"):
        # a topology with random weights, planned to be priced: nothing meaningful to compare
        check_text = ("plan check: not run (random weights: a plan to price, not to serve); "
                      "servers refuse this plan unless forced")
    elif args.check != "none":
        # the precision is the compiler's to choose unless the user fixed it
        may_retry = not args.precise and args.scale_bits is None
        plan, _, check_text = check_and_retry(plan, model, xs, source, make_plan, current,
                                              may_retry, args.check, args.max_error,
                                              args.check_inputs)
    if args.sanitize is not None:  # after the check: flooding is the server's, on purpose
        plan = _sanitize(plan, model, calib_x, args)
    cal = _calibration(plan, args, show)
    text = report(plan, cal).to_text() + "\n" + check_text
    print(text)
    if args.out:
        json_path = plan.save(args.out)
        Path(f"{args.out}.report.txt").write_text(rewrites_text + "\n\n" + text + "\n")
        print(f"\nwrote {json_path}, {args.out}.plan.npz and {args.out}.report.txt")
    return 0


def main(argv: list[str] | None = None) -> int:
    """A user's mistake (unknown model, unreadable file, impossible limits) is one clear line on
    stderr and exit code 2, not a traceback."""
    import sys

    from heinfer.errors import HeinferError

    try:
        return _main(argv)
    except HeinferError as e:
        print(f"heinfer-compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
