"""`heinfer`: the command line, a thin layer over the SDK (and `serve` over the server).

    heinfer serve [--data-dir D --host H --port P --workers N ...]     run the service
    heinfer compile MODEL [--objective latency --out PREFIX ...]       = heinfer-compile
    heinfer health                                                     readiness of a server
    heinfer models list | show NAME | add NAME.plan.json | remove NAME
    heinfer keygen MODEL                                               make/show local keys
    heinfer predict MODEL FILE.png|FILE.npy ...                        encrypted predictions
    heinfer sessions list | delete ID

Connection: --url (HEINFER_URL, default http://127.0.0.1:8000), --api-key (HEINFER_API_KEY);
`models add/remove` use --admin-key (HEINFER_ADMIN_KEY). Output is readable text, or JSON with
--json. Exit codes: 0 ok, 1 the server refused, 2 usage or local error, 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args: argparse.Namespace, admin: bool = False):
    from heinfer_client.sdk import Client

    key = (args.admin_key or os.environ.get("HEINFER_ADMIN_KEY")) if admin else None
    key = key or args.api_key or os.environ.get("HEINFER_API_KEY")
    verify: bool | str = args.cacert or True
    return Client(args.url, key, keystore=args.keystore, allow_insecure=args.allow_insecure,
                  verify=verify)


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else text)


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        h = c.health(ready=not args.live)
    _out(args, h, f"{args.url}: {h.get('status')}" + (
        f" ({h.get('workers')} workers, {h.get('models')} models)" if "workers" in h and
        h.get("workers") is not None else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    admin = args.action in ("add", "remove")
    with _client(args, admin=admin) as c:
        if args.action == "list":
            rows = c.models()
            text = "\n".join(f"{m['name']:<24} plan {m['plan_hash']}  {m['params']}"
                             for m in rows) or "(no models)"
            _out(args, rows, text)
        elif args.action == "show":
            m = c.model(args.name)
            spec = m.spec
            text = (f"{m.name}  plan {m.plan_hash} (format {spec.plan_format}, heinfer "
                    f"{spec.heinfer_version})\n"
                    f"  params      {spec.params.describe()}\n"
                    f"  input       shape {spec.input_shape}, "
                    f"{m.limits.get('input_ciphertexts')} ciphertext(s), layout "
                    f"{spec.input_layout.get('kind')}\n"
                    f"  rotations   {len(spec.rotation_steps)} Galois keys: "
                    f"{spec.rotation_steps}\n"
                    f"  output      {len(spec.output.labels) or '?'} values, labels "
                    f"{spec.output.labels}")
            _out(args, m.info, text)
        elif args.action == "add":
            info = c.add_model(args.plan, name=args.name, replace=args.replace)
            _out(args, info, f"added {info['name']} (plan {info['plan_hash']})")
        elif args.action == "remove":
            c.remove_model(args.name)
            _out(args, {"removed": args.name}, f"removed {args.name}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    with _client(args) as c:
        m = c.model(args.model)
        entry = c.keystore.entry(c.url, m.name, m.plan_hash)
        existed = entry.exists()
        t0 = time.perf_counter()
        keys = m.keys()
        eval_bytes = len(keys.eval_keys_wire())
        seconds = time.perf_counter() - t0
        data = {"model": m.name, "plan_hash": m.plan_hash, "secret_key": str(entry.secret_path),
                "reused": existed, "eval_key_bytes": eval_bytes,
                "rotation_steps": m.spec.rotation_steps, "seconds": round(seconds, 3)}
        text = (f"{'reused' if existed else 'made'} keys for {m.name} (plan {m.plan_hash}) in "
                f"{seconds:.2f} s\n  secret key   {entry.secret_path} (0600, never sent)\n"
                f"  eval keys    {eval_bytes / 1e6:.2f} MB to upload: relinearization + "
                f"{len(m.spec.rotation_steps)} Galois keys")
        if args.upload:
            s = m.session()
            data["session_id"] = s.id
            text += f"\n  session      {s.id}"
        _out(args, data, text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from heinfer_client.images import load_inputs

    with _client(args) as c:
        m = c.model(args.model)
        inputs: list[tuple[str, Any]] = []
        for f in args.files:
            xs = load_inputs(f, m.spec.input_shape)
            inputs += [(f if len(xs) == 1 else f"{f}[{i}]", x) for i, x in enumerate(xs)]
        s = m.session()
        bar = tqdm(total=len(inputs), unit="img", desc="encrypted inference",
                   disable=args.no_progress or args.json, file=sys.stderr)
        t0 = time.perf_counter()
        preds = s.predict_batch([x for _, x in inputs], concurrency=args.concurrency,
                                progress=lambda done, total: bar.update(1))
        wall = time.perf_counter() - t0
        bar.close()
    rows = [{"input": name, **p.to_dict()} for (name, _), p in zip(inputs, preds, strict=True)]
    if args.json:
        print(json.dumps({"model": m.name, "plan_hash": m.plan_hash, "session_id": s.id,
                          "key_upload_bytes": s.key_upload_bytes, "seconds": round(wall, 3),
                          "predictions": rows}, indent=1))
        return 0
    width = max(len(r["input"]) for r in rows)
    for r, p in zip(rows, preds, strict=True):
        name = p.label_name if p.label_name is not None else str(p.label)
        server = f", server {p.server_ms:.0f} ms" if p.server_ms is not None else ""
        print(f"{r['input']:<{width}}  {name:<14} p={p.probabilities[p.label]:.3f}   "
              f"[{p.seconds * 1e3:.0f} ms{server}, {p.bytes_sent / 1e3:.0f} KB up, "
              f"{p.bytes_received / 1e3:.0f} KB down]")
    print(f"{len(preds)} prediction(s) in {wall:.2f} s; session {s.id}"
          + (f" (uploaded {s.key_upload_bytes / 1e6:.1f} MB of evaluation keys)"
             if s.key_upload_bytes else " (reused)"))
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            rows = c.sessions()
            _out(args, rows, "\n".join(f"{r['session_id']}  {r['model']:<20} "
                                       f"{r['key_bytes'] / 1e6:.1f} MB" for r in rows)
                 or "(no sessions)")
        else:
            c.delete_session(args.session_id)
            _out(args, {"deleted": args.session_id}, f"deleted {args.session_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("HEINFER_URL", DEFAULT_URL))
    common.add_argument("--api-key", default=None, help="default: $HEINFER_API_KEY")
    common.add_argument("--admin-key", default=None, help="default: $HEINFER_ADMIN_KEY")
    common.add_argument("--keystore", default=None, help="default: $HEINFER_HOME or ~/.heinfer")
    common.add_argument("--cacert", default=None, help="CA bundle for a TLS server")
    common.add_argument("--allow-insecure", action="store_true",
                        help="accept models with insecure test parameters")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    ap = argparse.ArgumentParser(prog="heinfer", description="heinfer: encrypted inference "
                                 "client and server")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the server (flags: heinfer serve --help)",
                   add_help=False)
    sub.add_parser("compile", help="compile a model to a plan and report (flags: heinfer "
                   "compile --help; same as heinfer-compile)", add_help=False)
    h = sub.add_parser("health", parents=[common], help="is the server ready?")
    h.add_argument("--live", action="store_true", help="liveness instead of readiness")
    h.set_defaults(fn=cmd_health)

    m = sub.add_parser("models", help="list, show, add, remove models")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", parents=[common])
    show = msub.add_parser("show", parents=[common])
    show.add_argument("name")
    add = msub.add_parser("add", parents=[common], help="admin: serve a plan file")
    add.add_argument("plan", help="NAME.plan.json (NAME.plan.npz beside it)")
    add.add_argument("--name", default=None)
    add.add_argument("--replace", action="store_true")
    rm = msub.add_parser("remove", parents=[common], help="admin: stop serving a model")
    rm.add_argument("name")
    m.set_defaults(fn=cmd_models)

    k = sub.add_parser("keygen", parents=[common], help="make (or show) local keys for a model")
    k.add_argument("model")
    k.add_argument("--upload", action="store_true", help="also create a server session")
    k.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("predict", parents=[common], help="encrypted predictions for files")
    p.add_argument("model")
    p.add_argument("files", nargs="+", help="PNG images or .npy arrays (one input or a batch)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_predict)

    s = sub.add_parser("sessions", help="your sessions on the server")
    ssub = s.add_subparsers(dest="action", required=True)
    ssub.add_parser("list", parents=[common])
    d = ssub.add_parser("delete", parents=[common])
    d.add_argument("session_id")
    s.set_defaults(fn=cmd_sessions)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server parses its own flags
        from heinfer_server.main import main as serve

        return serve(argv[1:])
    if argv[:1] == ["compile"]:  # the compiler too (same as heinfer-compile)
        from heinfer_packing.cli import main as compile_model

        return compile_model(argv[1:])
    args = build_parser().parse_args(argv)
    from heinfer.errors import HeinferError
    from heinfer_client import errors

    try:
        return args.fn(args)
    except errors.TransportError as e:
        print(f"heinfer: cannot reach {args.url}: {e}", file=sys.stderr)
        return 3
    except errors.APIError as e:
        if args.json:
            print(json.dumps({"error": {"status": e.status, "code": e.code, "detail": e.detail,
                                        "request_id": e.request_id}}))
        else:
            print(f"heinfer: {e.code}: {e.detail}", file=sys.stderr)
        return 1
    except (errors.ClientError, HeinferError, ValueError, OSError) as e:
        print(f"heinfer: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
