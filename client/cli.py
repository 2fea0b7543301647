"""`heinfer`: the command line, a thin layer over the SDK (and `serve` over the server).

    heinfer serve [--data-dir D --host H --port P --workers N ...]     run the service
    heinfer compile MODEL [--objective latency --out PREFIX ...]       = heinfer-compile
    heinfer verify NAME.plan.json --inputs FILE.npz [--record]         encrypted vs plaintext
    heinfer health                                                     readiness of a server
    heinfer models list | show NAME | add NAME.plan.json | remove NAME
    heinfer keygen MODEL                                               make/show local keys
    heinfer predict MODEL FILE.png|FILE.jpg|FILE.npy ...               encrypted predictions
    heinfer sessions list | delete ID
    heinfer config show | set NAME VALUE [--server URL] | path         client settings

Connection options go before or after the subcommand (`heinfer --url U models list`); each
comes from the flag, else the environment, else the config file (heinfer_client.config):
--url (HEINFER_URL, default http://127.0.0.1:8000), --api-key (HEINFER_API_KEY), --admin-key
(HEINFER_ADMIN_KEY, for `models add/remove`), --cacert (HEINFER_CACERT), --keystore
(HEINFER_HOME). Output is readable text, or JSON with --json; progress goes to stderr (a bar
on a terminal, plain lines when piped; --no-progress). Exit codes: 0 ok, 1 the server refused,
2 usage or local error, 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from heinfer_client.config import DEFAULT_URL, Resolved, resolve


def _settings(args: argparse.Namespace) -> Resolved:
    if getattr(args, "_settings", None) is None:
        args._settings = resolve(url=args.url, api_key=args.api_key, admin_key=args.admin_key,
                                 cacert=args.cacert, keystore=args.keystore)
    return args._settings


def _client(args: argparse.Namespace, admin: bool = False):
    from heinfer_client.sdk import Client

    cfg = _settings(args)
    return Client(keystore=cfg.keystore, allow_insecure=args.allow_insecure,
                  config=cfg.as_admin() if admin else cfg)


def _progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or args.json)


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else text)


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        h = c.health(ready=not args.live)
        url = c.url
    _out(args, h, f"{url}: {h.get('status')}" + (
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
            info = c.add_model(args.plan, name=args.name, replace=args.replace,
                               force=args.force)
            _out(args, info, f"added {info['name']} (plan {info['plan_hash']})")
        elif args.action == "remove":
            c.remove_model(args.name)
            _out(args, {"removed": args.name}, f"removed {args.name}")
    return 0


def _make_keys(args: argparse.Namespace, c, m) -> tuple[Any, bool, float]:
    """The model's local keys (made, or read back), with a progress line: making the Galois
    keys is one SEAL call of seconds to minutes."""
    from heinfer.progress import Phase

    existed = c.keystore.entry(c.url, m.name, m.plan_hash).exists()
    t0 = time.perf_counter()
    with Phase(f"{'loading' if existed else 'generating'} keys for {m.name} "
               f"({len(m.spec.rotation_steps)} Galois keys, {m.spec.params.describe()})",
               disable=not _progress(args)):
        keys = m.keys()
        keys.eval_keys_wire()
    return keys, existed, time.perf_counter() - t0


def _session(args: argparse.Namespace, m):
    """A session: reused, or created with an upload progress bar."""
    from heinfer.progress import Progress

    bar: Progress | None = None

    def progress(sent: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, "uploading evaluation keys", unit="B",
                           disable=not _progress(args))
        bar.update(sent - bar.n)

    try:
        return m.session(progress=progress)
    finally:
        if bar is not None:
            bar.close()


def cmd_keygen(args: argparse.Namespace) -> int:
    with _client(args) as c:
        m = c.model(args.model)
        entry = c.keystore.entry(c.url, m.name, m.plan_hash)
        keys, existed, seconds = _make_keys(args, c, m)
        eval_bytes = len(keys.eval_keys_wire())
        data = {"model": m.name, "plan_hash": m.plan_hash, "secret_key": str(entry.secret_path),
                "reused": existed, "eval_key_bytes": eval_bytes,
                "rotation_steps": m.spec.rotation_steps, "seconds": round(seconds, 3)}
        text = (f"{'reused' if existed else 'made'} keys for {m.name} (plan {m.plan_hash}) in "
                f"{seconds:.2f} s\n  secret key   {entry.secret_path} (0600, never sent)\n"
                f"  eval keys    {eval_bytes / 1e6:.2f} MB to upload: relinearization + "
                f"{len(m.spec.rotation_steps)} Galois keys")
        if args.upload:
            s = _session(args, m)
            data["session_id"] = s.id
            text += f"\n  session      {s.id}"
        _out(args, data, text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from heinfer.progress import Progress
    from heinfer_client.errors import InputError
    from heinfer_client.images import load_inputs

    with _client(args) as c:
        m = c.model(args.model)
        convert = "grey" if args.grey else "rgb" if args.rgb else None
        inputs: list[tuple[str, Any]] = []
        for f in args.files:
            xs = load_inputs(f, m.spec.input_shape, batch=args.batch, convert=convert)
            try:  # every input checked before keys are made or anything is sent
                xs = [m.preprocess(x, args.normalized) for x in xs]
            except InputError as e:
                raise InputError(f"{f}: {e}") from e
            many = args.batch and f.lower().endswith(".npy")
            inputs += [(f"{f}[{i}]" if many else f, x) for i, x in enumerate(xs)]
        _make_keys(args, c, m)
        s = _session(args, m)
        t0 = time.perf_counter()
        with Progress(len(inputs), "encrypted inference", unit="img",
                      disable=not _progress(args)) as bar:
            preds = s.predict_batch([x for _, x in inputs], concurrency=args.concurrency,
                                    normalized=True,
                                    progress=lambda done, total: bar.update(1))
        wall = time.perf_counter() - t0
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


def cmd_config(args: argparse.Namespace) -> int:
    from heinfer_client import config

    if args.action == "path":
        print(config.config_path())
        return 0
    if args.action == "set":
        path = config.set_value(args.name, args.value, server=args.server)
        _out(args, {"path": str(path), "set": args.name},
             f"set {args.name} in {path} (0600)")
        return 0
    cfg = _settings(args)
    shown = {}
    from heinfer_client.keystore import default_root

    for name in ("url", "api_key", "admin_key", "cacert", "keystore"):
        value = getattr(cfg, name)
        source = cfg.describe(name) if value else "not set"
        if name == "keystore" and not value:
            value, source = str(default_root()), "default"
        if value and name in config.SECRET_FIELDS:
            value = f"{value[:4]}... ({len(value)} characters)"
        shown[name] = {"value": value, "from": source}
    _out(args, {"config_file": str(cfg.path), **shown},
         f"config file  {cfg.path}{'' if cfg.path.exists() else ' (absent)'}\n" + "\n".join(
             f"{n:<11}  {v['value'] or '-'}   ({v['from']})" for n, v in shown.items()))
    return 0


CONNECTION = [  # (flag, help): global options, accepted before or after the subcommand
    ("--url", f"server URL (HEINFER_URL, config file, default {DEFAULT_URL})"),
    ("--api-key", "API key (HEINFER_API_KEY, config file)"),
    ("--admin-key", "admin key for models add/remove (HEINFER_ADMIN_KEY, config file)"),
    ("--keystore", "local key store (HEINFER_HOME, config file, default ~/.heinfer)"),
    ("--cacert", "CA bundle for a TLS server (HEINFER_CACERT, config file)"),
]
SWITCHES = [("--allow-insecure", "accept models with insecure test parameters"),
            ("--json", "machine-readable output"),
            ("--no-progress", "no progress display on stderr")]


def _add_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # below the subcommand the defaults are SUPPRESS, so they cannot overwrite a value given
    # above it (argparse copies a subparser's defaults over the parent's namespace)
    for flag, help_ in CONNECTION:
        parser.add_argument(flag, default=None if top else argparse.SUPPRESS, help=help_)
    for flag, help_ in SWITCHES:
        parser.add_argument(flag, action="store_true",
                            default=False if top else argparse.SUPPRESS, help=help_)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_options(common, top=False)

    ap = argparse.ArgumentParser(prog="heinfer", description="heinfer: encrypted inference "
                                 "client and server", epilog="settings: flag > environment "
                                 "> config file (heinfer config path) > default")
    _add_options(ap, top=True)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the server (flags: heinfer serve --help)",
                   add_help=False)
    sub.add_parser("verify", help="run a plan encrypted on inputs and compare with plaintext "
                   "(flags: heinfer verify --help)", add_help=False)
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
    add.add_argument("--force", action="store_true",
                     help="serve a plan without a passed check record (heinfer verify)")
    rm = msub.add_parser("remove", parents=[common], help="admin: stop serving a model")
    rm.add_argument("name")
    m.set_defaults(fn=cmd_models)

    k = sub.add_parser("keygen", parents=[common], help="make (or show) local keys for a model")
    k.add_argument("model")
    k.add_argument("--upload", action="store_true", help="also create a server session")
    k.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("predict", parents=[common], help="encrypted predictions for files",
                       description="Images (PNG, JPEG, ... read with Pillow) are uint8 pixels, "
                       "normalized here with what the model publishes. A .npy array holds one "
                       "input: uint8 pixels, or floats already normalized (--normalized).")
    p.add_argument("model")
    p.add_argument("files", nargs="+", help="images or .npy arrays")
    p.add_argument("--normalized", action="store_true",
                   help=".npy floats are already scaled and normalized as the model computes "
                        "(without it, float arrays are refused: pixels go in as uint8)")
    p.add_argument("--batch", action="store_true",
                   help="each .npy holds a batch along its first dimension")
    conv = p.add_mutually_exclusive_group()
    conv.add_argument("--grey", "--gray", action="store_true",
                      help="convert colour images to grey for a 1-channel model (else refused)")
    conv.add_argument("--rgb", action="store_true",
                      help="copy grey images to R, G, B for a 3-channel model (else refused)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.set_defaults(fn=cmd_predict)

    s = sub.add_parser("sessions", help="your sessions on the server")
    ssub = s.add_subparsers(dest="action", required=True)
    ssub.add_parser("list", parents=[common])
    d = ssub.add_parser("delete", parents=[common])
    d.add_argument("session_id")
    s.set_defaults(fn=cmd_sessions)

    cf = sub.add_parser("config", help="show or set client settings (URL, keys)")
    csub = cf.add_subparsers(dest="action", required=True)
    csub.add_parser("show", parents=[common], help="settings in force and where each is from")
    cset = csub.add_parser("set", parents=[common], help="write one setting to the config "
                           "file (0600)")
    cset.add_argument("name", choices=["url", "api_key", "admin_key", "cacert", "keystore"])
    cset.add_argument("value", help="the value ('' removes it)")
    cset.add_argument("--server", default=None,
                      help="for this server URL only (a [servers.\"URL\"] table)")
    csub.add_parser("path", parents=[common], help="where the config file is")
    cf.set_defaults(fn=cmd_config)
    return ap


def _hand_over(argv: list[str]) -> list[str] | None:
    """`serve`/`compile` parse their own flags: the argv to hand over (global options before
    the subcommand: only --no-progress, passed on to compile), or None for the client."""
    takes_value = {flag for flag, _ in CONNECTION}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        i += 1 + (argv[i] in takes_value)
    if i >= len(argv) or argv[i] not in ("serve", "compile") or i == 0:
        return None
    before = argv[:i]
    if argv[i] == "compile" and before == ["--no-progress"]:
        return [argv[i], *argv[i + 1:], "--no-progress"]
    print(f"heinfer: {' '.join(before)} before `{argv[i]}`: its own flags go after it "
          f"(heinfer {argv[i]} --help); the client options do not apply to it", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = _hand_over(argv) or argv
    if argv[:1] == ["serve"]:  # the server parses its own flags
        from heinfer_server.main import main as serve

        return serve(argv[1:])
    if argv[:1] == ["verify"]:  # check a plan encrypted against plaintext (heinfer.check)
        from heinfer.check import verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["compile"]:  # the compiler too (same as heinfer-compile)
        from heinfer_packing.cli import main as compile_model

        return compile_model(argv[1:])
    args = build_parser().parse_args(argv)
    from heinfer.errors import HeinferError
    from heinfer_client import errors

    try:
        return args.fn(args)
    except errors.TransportError as e:
        cfg = _settings(args)
        print(f"heinfer: cannot reach {cfg.url} (URL from {cfg.describe('url')}): {e}\n"
              f"  to use another server: {cfg.hint('url')}", file=sys.stderr)
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
