"""`heinfer serve`: flags override HEINFER_* environment variables; uvicorn runs the app.

One uvicorn process serves HTTP (async: streaming bodies, SQLite, framing checks); HE work runs
in its process pool (`--workers`). uvicorn's own `--workers` is not used: the queue bound and
metrics live in the one API process. TLS: `--ssl-certfile/--ssl-keyfile` (uvicorn's options).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

FLAGS = [  # (flag, settings field, type, help)
    ("--data-dir", "data_dir", str, "data directory (SQLite + files)"),
    ("--host", "host", str, "bind address"),
    ("--port", "port", int, "TCP port"),
    ("--workers", "workers", int, "HE worker processes (default: cores)"),
    ("--max-queue", "max_queue", int, "waiting requests beyond busy workers"),
    ("--request-timeout", "request_timeout_s", float, "seconds of HE work per request"),
    ("--shutdown-grace", "shutdown_grace_s", float, "seconds in-flight requests may finish "
     "after SIGTERM"),
    ("--session-ttl", "session_idle_ttl_s", float, "idle seconds before a session expires"),
    ("--max-key-bytes", "max_key_bytes", int, "largest evaluation-key upload"),
    ("--plan", "preload_plans", str, "plan file(s) to serve, comma separated"),
    ("--ssl-certfile", "ssl_certfile", str, "TLS certificate (PEM)"),
    ("--ssl-keyfile", "ssl_keyfile", str, "TLS private key (PEM)"),
    ("--log-level", "log_level", str, "debug, info, warning, error"),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="heinfer serve", description=__doc__.splitlines()[0])
    for flag, dest, typ, help_ in FLAGS:
        ap.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    ap.add_argument("--allow-insecure-params", dest="allow_insecure_params",
                    action="store_true", default=None,
                    help="accept plans with insecure test parameters (tests only)")
    lost = ap.add_mutually_exclusive_group()
    lost.add_argument("--adopt-orphans", dest="orphans", action="store_const", const="adopt",
                      default=None, help="database lost but plan/key files remain: rebuild "
                                         "models and sessions from the files")
    lost.add_argument("--discard-orphans", dest="orphans", action="store_const",
                      const="discard", default=None,
                      help="database lost but plan/key files remain: move them to quarantine/ "
                           "and start empty")
    return ap


def _unservable_name(plan: Path) -> str | None:
    """Why a preloaded plan's name cannot be served, or None (other checks: the workers')."""
    from heinfer.names import MODEL_NAME_RE, is_model_name, to_model_name

    try:
        name = json.loads(plan.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: install_plan reports it with its code
    if not isinstance(name, str) or is_model_name(name):
        return None
    better = to_model_name(name) or "my-model"
    return (f"plan {plan} is named {name!r}, which cannot be served (model names match "
            f"{MODEL_NAME_RE.pattern}): compile it again (`heinfer compile` now names it "
            f"{better!r}; choose another with --name)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        import uvicorn

        from heinfer_server import logs
        from heinfer_server.app import create_app
        from heinfer_server.protocol import guarded_protocol
        from heinfer_server.recovery import DataDirError, preflight
        from heinfer_server.settings import Settings
    except ImportError as e:  # the client can be installed without the server extra
        print(f"heinfer serve needs the server extra: pip install 'heinfer[server]' ({e})",
              file=sys.stderr)
        return 2
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError, OSError) as e:
        print(f"heinfer serve: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    try:
        preflight(settings.data_dir, settings.orphans)
    except DataDirError as e:
        print(f"heinfer serve: {e}", file=sys.stderr)
        return 2
    for plan in settings.plan_paths():  # a typo must stop the start, not leave it "not ready"
        missing = [p for p in (plan, Path(str(plan).removesuffix(".json") + ".npz"))
                   if not p.is_file()]
        if missing:
            print(f"heinfer serve: plan file {missing[0]} not found (--plan / "
                  "HEINFER_PRELOAD_PLANS name NAME.plan.json, with NAME.plan.npz beside it)",
                  file=sys.stderr)
            return 2
        if (problem := _unservable_name(plan)) is not None:
            print(f"heinfer serve: {problem}", file=sys.stderr)
            return 2
    logs.configure(settings.log_level, settings.log_json)
    proxies = settings.trusted_proxies.strip()
    # a server that can never become ready stops (exit 2) so a supervisor or the operator
    # sees it, instead of staying up answering 503 not_ready
    server: list[uvicorn.Server] = []
    app = create_app(settings, on_startup_failure=lambda: setattr(server[0], "should_exit", True))
    server.append(uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        server_header=False,
        # X-Forwarded-For decides the address that wrong keys are counted against:
        # believed only from configured proxies (uvicorn's default trusts 127.0.0.1)
        proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
        http=guarded_protocol(settings.header_timeout_s, settings.max_header_bytes))))
    try:
        server[0].run()
    except KeyboardInterrupt:
        pass
    state = getattr(app.state, "heinfer", None)
    if state is not None and state.startup_error:
        print(f"heinfer serve: {state.startup_error}", file=sys.stderr)
        return 2
    if not server[0].started:  # as uvicorn.run: the socket or the lifespan failed
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
