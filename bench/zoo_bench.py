"""Every model in the zoo, one image at a time (latency) and in throughput mode (batch in slots).

    .venv/bin/python -m bench.zoo_bench [--images 20] [--models NAME ...] [--quick]
                                        [--max-latency-s 20] [--max-batch-s 60] [--recalibrate]

Batch 1 (latency): each model is lowered with its default plan (`lower(model)`; conformal
networks with `lower_conformal`, calibrated on the first 64 test images) and priced by the
compiler's report with this machine's calibration. Models predicted at most `--max-latency-s`
per image run encrypted on the first `--images` Fashion-MNIST test images: the client (key
generation, encryption, decryption, in this process) and the server (a fresh spawned process
that compiles the plan, loads the key bytes, and per image deserializes, evaluates and
serializes) exchange bytes only, so the server's peak resident memory (VmHWM of its process,
interpreter and libraries included; `server_baseline_mb` is that process before any HE object)
is measured alone. The figures are those of
`evaluate_encrypted` (`EncryptedEval.summary`: same timers, same definitions). Slower models are
reported as "predicted" (predicted ms, key and upload bytes from the calibration).

Throughput mode: `lower(model, batch=True)` (one image per slot; conformal networks have no batch
lowering: "n/a"). Predicted seconds per batch and images/s for one worker process from the
report, estimated memory from `heinfer_packing.search.Candidate`; batches predicted at most
`--max-batch-s` run once in one worker process (`bench.throughput_bench.run_workers`) on
min(slots, 10,000) test images.

`--quick`: 1 image per model, only models predicted under 2 s per image (the others get their
batch-1 prediction only), throughput predicted only; calibrations that are not cached are
measured with 1 repeat and not cached (predictions then approximate). Writes
bench/results/zoo_bench.json (zoo_bench_quick.json) and, for full runs, the markdown tables to
bench/results/zoo_bench.txt. Not a test: figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench.results_io import RESULTS, save_results
from bench.throughput_bench import peak_rss_mb, run_workers
from heinfer.backends import make_backend
from heinfer.backends.base import EvalKeyBytes
from heinfer.codec import decrypt_decode_batch, encode_encrypt_batch, encode_encrypt_bytes
from heinfer.errors import HeinferError
from heinfer.plan import CompiledPlan, Plan
from heinfer_models import fashion_mnist, zoo
from heinfer_models.evaluate import EncryptedEval, decode_logits
from heinfer_packing.calibrate import calibrate, calibration_path, load_or_calibrate
from heinfer_packing.conformal import ConformalNet, lower_conformal
from heinfer_packing.lower import lower
from heinfer_packing.report import report
from heinfer_packing.search import Candidate

QUICK_MAX_LATENCY_S = 2.0
CONFORMAL_CALIB_IMAGES = 64
CONFORMAL_NO_BATCH = ("conformal: no batch-in-slots lowering (lower_conformal packs one image "
                      "per plan, in replicated copies)")


# -- server side (a fresh process per model) ---------------------------------------------------
def _serve(plan: Plan, keys: EvalKeyBytes, bodies: list[list[bytes]]) -> dict:
    """What a server worker does for one model: compile the plan, load the client's key bytes,
    then per request deserialize, evaluate and serialize (the timed part, as in
    evaluate_encrypted). Runs in a spawned process: its peak memory is this server's alone."""
    baseline_mb = peak_rss_mb()  # interpreter and libraries, before any HE object
    t = time.perf_counter()
    be = make_backend(plan.params)
    compiled = CompiledPlan(plan, be)
    be.load_eval_keys(keys)
    setup_s = time.perf_counter() - t
    server_s, replies = [], []
    for body in bodies:
        t1 = time.perf_counter()
        out = compiled.run([be.ciphertext_from_bytes(b) for b in body])
        reply = [be.ciphertext_to_bytes(c) for c in out]
        server_s.append(time.perf_counter() - t1)
        replies.append(reply)
    return {"server_s": server_s, "replies": replies, "setup_s": setup_s,
            "baseline_mb": baseline_mb, "peak_mb": peak_rss_mb()}


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


# -- client side and bookkeeping ---------------------------------------------------------------
class Calibrations:
    """One calibration per parameter set in a run: cached, measured (and cached), or in --quick
    measured with 1 repeat and kept in memory only."""

    def __init__(self, quick: bool, refresh: bool):
        self.quick, self.refresh, self.done = quick, refresh, {}

    def get(self, params) -> tuple[dict, str]:
        path = calibration_path(params)
        if path not in self.done:
            if self.refresh and not self.quick:
                cal, how = load_or_calibrate(params, refresh=True), "measured in this run"
            elif path.exists():
                cal = load_or_calibrate(params)
                how = f"cached ({cal.get('date', '?')})"
            elif self.quick:
                cal, how = calibrate(params, repeat=1), "1 repeat, not cached (--quick)"
            else:
                cal, how = load_or_calibrate(params), "measured in this run"
            self.done[path] = (cal, how)
        return self.done[path]


def lower_latency(model, name: str, calib_x: np.ndarray) -> Plan:
    if isinstance(model, ConformalNet):
        plan, _ = lower_conformal(model, model.metadata.get("name", name), calib_x=calib_x)
        return plan
    return lower(model)


def run_latency(model, plan: Plan, xs: np.ndarray, labels: np.ndarray) -> dict:
    """Encrypted batch-1 run: client here, server in a fresh process; figures as
    evaluate_encrypted's summary."""
    client = make_backend(plan.params)
    spec = plan.spec(client)
    t = time.perf_counter()
    keys = client.generate_keys(spec.rotation_steps)
    res = EncryptedEval(plan, keys.nbytes(), time.perf_counter() - t, backend=spec.backend)
    bodies = []
    for x in xs:
        t = time.perf_counter()
        bodies.append(encode_encrypt_bytes(client, spec, x))
        res.encrypt_s.append(time.perf_counter() - t)
    srv = _in_fresh_process(_serve, plan, keys, bodies)
    for x, body, reply, s in zip(xs, bodies, srv["replies"], srv["server_s"], strict=True):
        t = time.perf_counter()
        logits = decode_logits(spec, [client.decrypt(client.ciphertext_from_bytes(b))
                                      for b in reply], x)
        res.decrypt_s.append(time.perf_counter() - t)
        res.server_s.append(s)
        res.upload_bytes.append(sum(map(len, body)))
        res.download_bytes.append(sum(map(len, reply)))
        res.logits.append(logits)
        res.plain_logits.append(model.forward(x))
    out = res.summary(labels[: len(xs)])
    out.update(peak_server_mb=srv["peak_mb"], server_baseline_mb=srv["baseline_mb"],
               server_setup_s=srv["setup_s"])
    return out


def run_batch(name: str, model, bplan: Plan, images: np.ndarray, labels: np.ndarray) -> dict:
    """One batch (one image per slot) in one worker process, as bench.throughput_bench."""
    batch = min(bplan.params.slots, len(images))
    xs = fashion_mnist.normalize(images[:batch], model.input_shape)
    client = make_backend(bplan.params)
    spec = bplan.spec(client)
    keys = client.generate_keys([])
    t = time.perf_counter()
    body = encode_encrypt_batch(client, spec, xs)
    enc_s = time.perf_counter() - t
    run = run_workers(name, keys.relin_keys, [body])
    t = time.perf_counter()
    he = decrypt_decode_batch(client, spec, [client.ciphertext_from_bytes(b)
                                             for b in run["replies"][0]], batch)
    dec_s = time.perf_counter() - t
    plain = np.stack([model.forward(x) for x in xs])
    return {"images": batch, "eval_s": run["eval_s"][0], "wall_s": run["wall_s"],
            "images_per_s": batch / run["eval_s"][0], "peak_server_mb": run["peak_mb"][0],
            "client_encrypt_s": enc_s, "client_decrypt_s": dec_s,
            "upload_bytes_per_image": sum(map(len, body)) / batch,
            "eval_key_bytes": keys.nbytes(),
            "agreement": float(np.mean(he.argmax(1) == plain.argmax(1))),
            "max_logit_error": float(np.abs(he - plain).max()),
            "encrypted_accuracy": float(np.mean(he.argmax(1) == labels[:batch]))}


def bench_model(name: str, images: np.ndarray, labels: np.ndarray, args, cals: Calibrations,
                ) -> dict:
    clock = _Clock()
    model = zoo.load(name)
    conformal = isinstance(model, ConformalNet)
    xs_all = fashion_mnist.normalize(images[: max(args.images, CONFORMAL_CALIB_IMAGES)],
                                     model.input_shape)
    plan = lower_latency(model, name, xs_all[:CONFORMAL_CALIB_IMAGES])
    clock.lap("lower")
    p = plan.params
    cal, how = cals.get(p)
    clock.lap("calibration")
    rep = report(plan, cal)
    clock.lap("report")
    row = {"model": name, "kind": "conformal" if conformal else "polynomial",
           "input_shape": list(model.input_shape), "params": p.describe(),
           "ring": p.poly_modulus_degree, "depth": p.depth,
           "depth_used": p.top_level - rep.layers[-1].level_out,
           "plaintext_accuracy": model.metadata.get("plaintext_accuracy"),
           "calibration": how}
    lat = {"input_ciphertexts": plan.input_layout.n_ct, "predicted_ms": rep.predicted_ms,
           "predicted_eval_key_bytes": rep.key_bytes(),
           "predicted_upload_bytes": rep.upload_bytes(),
           "estimated_memory_bytes": Candidate(name, plan, rep).memory_bytes}
    if rep.predicted_ms <= 1e3 * args.max_latency_s:
        lat["status"] = "measured"
        lat.update(run_latency(model, plan, xs_all[: args.images], labels))
        clock.lap("batch_1_run")
    else:
        lat["status"] = "predicted"
        lat["reason"] = (f"predicted {rep.predicted_ms / 1e3:.1f} s per image > "
                         f"{args.max_latency_s:g} s")
    row["latency"] = lat

    if conformal:
        row["throughput"] = {"status": "n/a", "reason": CONFORMAL_NO_BATCH}
    elif args.quick and lat["status"] != "measured":
        row["throughput"] = {"status": "skipped", "reason": "--quick: only the models under "
                                                            f"{args.max_latency_s:g} s per image"}
    else:
        row["throughput"] = bench_throughput(name, model, images, labels, args, cals)
        clock.lap("throughput")
    row["seconds"] = clock.laps
    return row


class _Clock:
    def __init__(self):
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self.laps[what] = now - self.t
        self.t = now


def bench_throughput(name, model, images, labels, args, cals: Calibrations) -> dict:
    try:
        bplan = lower(model, batch=True)
    except (HeinferError, NotImplementedError, ValueError) as e:
        return {"status": "n/a", "reason": f"lower(batch=True): {type(e).__name__}: {e}"}
    cal, _ = cals.get(bplan.params)
    brep = report(bplan, cal)
    cand = Candidate(name, bplan, brep)
    thr = {"slots": bplan.params.slots, "predicted_batch_s": brep.predicted_ms / 1e3,
           "predicted_images_per_s": cand.throughput,
           "estimated_memory_bytes": cand.memory_bytes,
           "predicted_eval_key_bytes": brep.key_bytes(),
           "predicted_upload_bytes_per_image": cand.upload_per_image}
    if args.quick:
        thr.update(status="predicted", reason="--quick: predictions only")
    elif thr["predicted_batch_s"] > args.max_batch_s:
        thr.update(status="predicted", reason=f"predicted {thr['predicted_batch_s']:.0f} s per "
                                              f"batch > {args.max_batch_s:g} s")
    else:
        thr["status"] = "measured"
        thr.update(run_batch(name, model, bplan, images, labels))
    return thr


# -- output ------------------------------------------------------------------------------------
def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(
        v / scale, fmt)


def tables(rows: list[dict]) -> str:
    out = ["Batch 1 (latency): measured on real test images, or predicted by the compiler "
           "(calibration of this machine).", "",
           "| model | ring n | depth | server ms / image (median) | predicted ms | client enc / "
           "dec ms | upload KB | download KB | eval keys MB | peak server MB | max logit error "
           "| top-1 agreement | encrypted accuracy | images |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        la = r["latency"]
        if la["status"] == "measured":
            cells = [_f(la["server_ms_median"], ".1f"), _f(la["predicted_ms"], ".1f"),
                     f"{la['encrypt_ms']:.1f} / {la['decrypt_ms']:.1f}",
                     _f(la["upload_bytes"], ".0f", 1e3), _f(la["download_bytes"], ".0f", 1e3),
                     _f(la["eval_key_bytes"], ".1f", 1e6), _f(la["peak_server_mb"], ".0f"),
                     _f(la["max_logit_error"], ".1e"), f"{la['agreement']:.0%}",
                     f"{la['encrypted_accuracy']:.0%}", str(la["images"])]
        else:
            cells = ["predicted", _f(la["predicted_ms"], ".1f"), "",
                     _f(la["predicted_upload_bytes"], ".0f", 1e3) + " (pred.)", "",
                     _f(la["predicted_eval_key_bytes"], ".1f", 1e6) + " (pred.)",
                     _f(la["estimated_memory_bytes"], ".0f", 1e6) + " (est.)",
                     "", "", "", "0"]
        out.append(f"| {r['model']} | {r['ring']} | {r['depth']} | " + " | ".join(cells) + " |")
    out += ["", "Throughput mode (one image per slot, one worker process): predicted by the "
            "compiler; measured on one batch where the prediction is under the limit.", "",
            "| model | images / batch | predicted s / batch | predicted images/s | measured s / "
            "batch | measured images/s | est. memory MB | peak server MB | eval keys MB | upload "
            "KB / image | top-1 agreement | max logit error |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        th = r["throughput"]
        if th["status"] in ("n/a", "skipped"):
            out.append(f"| {r['model']} | {th['status']}: {th['reason'].split(' (')[0]} |"
                       + " |" * 10)
            continue
        m = th["status"] == "measured"
        cells = [str(th["images"] if m else th["slots"]), _f(th["predicted_batch_s"], ".1f"),
                 _f(th["predicted_images_per_s"], ".1f"),
                 _f(th.get("eval_s"), ".1f") if m else "predicted",
                 _f(th.get("images_per_s"), ".1f"),
                 _f(th["estimated_memory_bytes"], ".0f", 1e6),
                 _f(th.get("peak_server_mb"), ".0f"),
                 _f(th.get("eval_key_bytes", th["predicted_eval_key_bytes"]), ".1f", 1e6),
                 _f(th.get("upload_bytes_per_image", th["predicted_upload_bytes_per_image"]),
                    ".1f", 1e3),
                 f"{th['agreement']:.3%}" if m else "", _f(th.get("max_logit_error"), ".1e")]
        out.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20, help="encrypted images per model")
    ap.add_argument("--models", nargs="+", choices=zoo.names(), default=None,
                    help="default: every model in the zoo")
    ap.add_argument("--max-latency-s", type=float, default=20.0,
                    help="run batch 1 encrypted only below this predicted time per image")
    ap.add_argument("--max-batch-s", type=float, default=60.0,
                    help="measure throughput only below this predicted time per batch")
    ap.add_argument("--recalibrate", action="store_true",
                    help="measure every parameter set's calibration again (refreshes the cache)")
    ap.add_argument("--quick", action="store_true",
                    help="1 image, models under 2 s per image, throughput predicted only")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.max_latency_s = 1, min(args.max_latency_s, QUICK_MAX_LATENCY_S)
    t = time.perf_counter()
    images, labels = fashion_mnist.load("test")
    cals = Calibrations(args.quick, args.recalibrate)
    rows = []
    for name in args.models or zoo.names():
        rows.append(bench_model(name, images, labels, args, cals))
        la, th = rows[-1]["latency"], rows[-1]["throughput"]
        ms = la.get("server_ms_median", la["predicted_ms"])
        laps = ", ".join(f"{k} {v:.1f}" for k, v in rows[-1]["seconds"].items())
        print(f"{name}: batch 1 {la['status']} ({ms:.1f} ms), throughput {th['status']} "
              f"(seconds: {laps})", flush=True)
    text = tables(rows)
    head = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"{time.strftime('%Y-%m-%d %H:%M')}; {args.images} image(s) per measured model; "
            f"limits {args.max_latency_s:g} s per image, {args.max_batch_s:g} s per batch")
    print(f"\n{head}\n\n{text}\n")
    save_results("zoo_bench", {
        "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "quick": args.quick,
        "images": args.images, "max_latency_s": args.max_latency_s,
        "max_batch_s": args.max_batch_s, "seconds": time.perf_counter() - t, "rows": rows,
    }, quick=args.quick)
    if not args.quick:
        (RESULTS / "zoo_bench.txt").write_text(f"{head}\n\n{text}\n")
        print(f"wrote {RESULTS / 'zoo_bench.txt'}")
    print(f"zoo_bench: {time.perf_counter() - t:.0f} s")
    sane = all(math.isfinite(r["latency"]["predicted_ms"]) and r["latency"]["predicted_ms"] > 0
               and (r["latency"]["status"] != "measured" or r["latency"]["server_ms_median"] > 0)
               for r in rows)
    return 0 if sane else 1


if __name__ == "__main__":
    raise SystemExit(main())
