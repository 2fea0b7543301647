"""The FastAPI application: `create_app(settings)`.

Start-up (lifespan): refuse a lost database next to plan or key files unless told what to do,
open the store and recover from a crash (uploads in progress dropped, files without a row moved
to the quarantine: recovery.py), load API keys, start the worker pool in the background (liveness
answers at once, readiness once workers run and preloaded plans are in), and a sweeper that
expires idle sessions. Shutdown stops the pool.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

from heinfer import __version__
from heinfer_server import errors, recovery
from heinfer_server import store as st
from heinfer_server.api.deps import get_principal
from heinfer_server.api.main import api_router
from heinfer_server.bodyguard import BodyGuard
from heinfer_server.conformance import install_openapi
from heinfer_server.logs import request_id_var
from heinfer_server.metrics import Metrics
from heinfer_server.pool import EvalPool
from heinfer_server.settings import Settings
from heinfer_server.state import ServerState, load_keys

log = logging.getLogger("heinfer.server")
RID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

DESCRIPTION = """Encrypted inference over CKKS. The secret key never leaves the client.

Flow: `GET /v1/models/{name}` (public spec) -> client makes keys -> `POST /v1/sessions`
(evaluation keys, binary) -> `POST /v1/models/{name}/predict` (ciphertexts, binary) -> client
decrypts. Binary bodies use the heinfer wire framing (module `heinfer.wire`). Errors are
`application/problem+json` with a stable `code`. Authenticate with `Authorization: Bearer KEY`.
"""


class RequestContext:
    """Pure ASGI middleware: request id, metrics by route template, one JSON log line per
    request, problem+json for anything unhandled. Unread request bodies: bodyguard.py."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if RID_RE.match(incoming) else uuid.uuid4().hex
        request_id_var.set(rid)
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(msg):
            nonlocal status, started
            if msg["type"] == "http.response.start":
                status, started = msg["status"], True
                MutableHeaders(scope=msg).append("X-Request-Id", rid)
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # the last resort: still a problem+json with the request id
            err = errors.classify(exc)
            status = err.status
            if not started:
                resp = JSONResponse(errors.problem_body(err, rid), status_code=err.status,
                                    media_type="application/problem+json", headers=err.headers)
                await resp(scope, receive, send_wrapper)
        finally:
            path = _route_label(scope)
            seconds = time.perf_counter() - t0
            if path != "/metrics":
                self.metrics.requests.labels(path, scope["method"], str(status)).inc()
                self.metrics.latency.labels(path, scope["method"]).observe(seconds)
            log.info("request", extra={"method": scope["method"], "route": path,
                                       "path": scope.get("path"), "status": status,
                                       "ms": round(seconds * 1e3, 2)})


def _route_label(scope) -> str:
    """The matched route's template with its mount prefix (`/v1/models/{name}/predict`):
    bounded label values, whatever paths callers send."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not template:
        return "unmatched"
    rendered = template
    for key, value in (scope.get("path_params") or {}).items():
        rendered = rendered.replace("{" + key + "}", str(value))
    path = scope.get("path", "")
    prefix = path[: len(path) - len(rendered)] if path.endswith(rendered) else ""
    return prefix + template


async def _background_start(state: ServerState,
                            on_failure: Callable[[], None] | None) -> None:
    from heinfer_server.api.routes.models import install_plan

    path = None
    try:
        await state.pool.warm_up()
        for path in state.settings.plan_paths():
            row, created = await install_plan(state, path, name=None, replace=True,
                                              force=state.settings.allow_unchecked_plans)
            log.info("plan preloaded", extra={"model": row.name, "plan_hash": row.plan_hash,
                                              "new": created})
        state.preload_done = True
        log.info("ready", extra={"workers": state.pool.workers})
    except Exception as e:
        what = f"preloading plan {path}" if path is not None else "starting the workers"
        reason = f"{e.code}: {e.detail}" if isinstance(e, errors.ApiError) else (
            f"{type(e).__name__}: {e}")
        state.startup_error = f"{what} failed: {reason}"
        if isinstance(e, errors.ApiError):  # the plan's own fault: one line, no traceback
            log.error("start-up failed", extra={"reason": state.startup_error})
        else:
            log.exception("start-up failed", extra={"reason": state.startup_error})
        if on_failure is not None:
            on_failure()


async def _sweeper(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.settings.sweep_interval_s)
        try:
            n = await asyncio.to_thread(state.sweep)
            if n:
                log.info("idle sessions expired", extra={"count": n})
        except Exception:
            log.exception("sweep failed")


def create_app(settings: Settings | None = None, *,
               on_startup_failure: Callable[[], None] | None = None) -> FastAPI:
    """`on_startup_failure` is called when the workers or a preloaded plan fail to start
    (`heinfer serve` stops and exits 2); without it the app stays up, not ready, saying why."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        lost = recovery.preflight(settings.data_dir, settings.orphans)
        report = recovery.Recovery(lost_database=lost)
        if lost is not None:
            recovery.set_aside_database(settings.data_dir.resolve(), report)
        store = st.Store(settings.data_dir)
        recovery.recover(store, report, adopt=lost is not None and settings.orphans == "adopt",
                         allow_insecure=settings.allow_insecure_params)
        for kind, n in report.quarantined.items():
            metrics.quarantined.labels(kind).inc(n)
        pool = EvalPool(workers=settings.workers, max_queue=settings.max_queue,
                        start_method=settings.mp_start_method,
                        cache_models=settings.worker_cache_models,
                        key_cache_bytes=settings.worker_key_cache_bytes,
                        key_cache_tenant_bytes=settings.worker_key_cache_tenant_bytes,
                        max_crashes=settings.max_crashes_per_key,
                        crash_window_s=settings.crash_window_s,
                        metrics=metrics)
        state = ServerState(settings, store, pool, metrics, load_keys(settings, store))
        state.sweep()
        metrics.models.set(len(st.list_models(store)))
        app.state.heinfer = state
        log.info("starting", extra={"data_dir": str(store.data_dir), "recovered": report.summary(),
                                    "models": [m.name for m in st.list_models(store)],
                                    "workers": settings.workers})
        tasks = [asyncio.create_task(_background_start(state, on_startup_failure)),
                 asyncio.create_task(_sweeper(state))]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            pool.shutdown()

    public_docs = not settings.docs_require_key
    app = FastAPI(title="heinfer", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url="/docs" if public_docs else None,
                  openapi_url="/openapi.json" if public_docs else None)
    errors.install(app)
    install_openapi(app)
    app.add_middleware(BodyGuard, idle_timeout=settings.body_idle_timeout_s,
                       total_timeout=settings.body_timeout_s)
    app.add_middleware(RequestContext, metrics=metrics)  # added last: the outermost
    app.include_router(api_router, prefix="/v1")
    metrics_deps = [Depends(get_principal)] if settings.metrics_require_key else []

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_deps)
    async def prometheus() -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    if not public_docs:  # the same pages, behind any API key
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(get_principal)])
        async def openapi_json() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(get_principal)])
        async def docs() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="heinfer - docs")

    @app.get("/", include_in_schema=False)
    async def root() -> dict:
        return {"service": "heinfer", "version": __version__, "docs": "/docs", "api": "/v1",
                "app": "/app/"}

    from heinfer_server import webapp  # the browser client (static files, strict CSP)

    app.mount("/app", webapp.PageFiles(), name="app")

    return app
