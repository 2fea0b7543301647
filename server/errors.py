"""Problem details (RFC 9457) with stable codes: the ONE place that maps errors to statuses.

Every error response is `application/problem+json`:

    {"type": "urn:heinfer:problem:unknown_session", "title": "Unknown session", "status": 404,
     "code": "unknown_session", "detail": "no session 's_…' for this API key",
     "request_id": "…"}

`code` is stable (clients and the SDK branch on it); `detail` is for people. A caller's mistake
is a 4xx; a 5xx means the server (or its capacity) failed. `PROBLEMS` is the table; `ApiError`
raises one of its codes; `EXCEPTIONS` maps `heinfer.errors` classes raised by the runtime.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from dataclasses import dataclass

from heinfer.errors import (
    DepthExhaustedError,
    HeinferError,
    InsecureParamsError,
    LayoutError,
    MissingKeyError,
    ModelFormatError,
    ParamsMismatchError,
    PlanVersionError,
    ScaleMismatchError,
    SecretKeyError,
    SerializationError,
)
from heinfer.wire import WireError

log = logging.getLogger("heinfer.server")


@dataclass(frozen=True)
class Problem:
    status: int
    title: str


PROBLEMS: dict[str, Problem] = {
    # authentication and authorization
    "missing_api_key": Problem(401, "Missing API key"),
    "invalid_api_key": Problem(401, "Invalid API key"),
    "admin_required": Problem(403, "Admin key required"),
    # unknown things
    "not_found": Problem(404, "Not found"),
    "unknown_model": Problem(404, "Unknown model"),
    "unknown_session": Problem(404, "Unknown session"),
    "method_not_allowed": Problem(405, "Method not allowed"),
    "session_expired": Problem(410, "Session expired"),
    "model_exists": Problem(409, "Model exists"),
    "plan_mismatch": Problem(409, "Plan changed"),
    # bodies
    "payload_too_large": Problem(413, "Payload too large"),
    "unsupported_media_type": Problem(415, "Unsupported media type"),
    "malformed_body": Problem(400, "Malformed body"),
    "wrong_kind": Problem(400, "Wrong body kind"),
    "wrong_count": Problem(400, "Wrong number of items"),
    "item_too_large": Problem(413, "Item too large"),
    "malformed_ciphertext": Problem(400, "Malformed ciphertext"),
    "malformed_keys": Problem(400, "Malformed evaluation keys"),
    "secret_key_refused": Problem(400, "Secret key refused"),
    "params_mismatch": Problem(400, "Parameters mismatch"),
    "missing_keys": Problem(400, "Missing evaluation keys"),
    "wrong_shape": Problem(400, "Wrong shape"),
    "session_model_mismatch": Problem(400, "Session made for another model"),
    "invalid_plan": Problem(400, "Invalid plan"),
    "plan_version": Problem(400, "Unsupported plan version"),
    "insecure_params": Problem(400, "Insecure parameters"),
    "unchecked_plan": Problem(400, "Plan not checked"),
    "invalid_name": Problem(400, "Invalid name"),
    "validation_error": Problem(422, "Invalid request"),
    "body_timeout": Problem(408, "Request body timeout"),
    "headers_too_large": Problem(431, "Request headers too large"),
    # limits
    "quota_exceeded": Problem(429, "Quota exceeded"),
    "rate_limited": Problem(429, "Too many requests"),
    "too_many_uploads": Problem(429, "Too many uploads at once"),
    "too_many_bad_keys": Problem(429, "Too many wrong API keys"),
    "too_many_crashes": Problem(429, "Too many requests that crashed a worker"),
    "overloaded": Problem(503, "Server busy"),
    "not_ready": Problem(503, "Not ready"),
    "timeout": Problem(504, "Evaluation timed out"),
    "insufficient_storage": Problem(507, "Insufficient storage"),
    # server-side data loss: the operator must restore or re-add (never a client error)
    "plan_files_missing": Problem(500, "Model files missing on the server"),
    "session_keys_missing": Problem(500, "Session keys missing on the server"),
    "worker_crashed": Problem(500, "Worker crashed"),  # final: the SDK does not retry it
    "internal": Problem(500, "Internal error"),
}


class ApiError(Exception):
    """An error with a code from `PROBLEMS`. Picklable, so workers can raise it too."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None):
        if code not in PROBLEMS:
            raise KeyError(f"unknown problem code {code!r}")
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return PROBLEMS[self.code].status

    def __reduce__(self):
        return (type(self), (self.code, self.detail, self.headers))


# heinfer runtime errors -> codes, most specific first. WireError carries its own code.
EXCEPTIONS: list[tuple[type[BaseException], str]] = [
    (SecretKeyError, "secret_key_refused"),
    (ParamsMismatchError, "params_mismatch"),
    (SerializationError, "malformed_body"),
    (LayoutError, "wrong_shape"),
    (MissingKeyError, "missing_keys"),
    (PlanVersionError, "plan_version"),
    (ModelFormatError, "invalid_plan"),
    (InsecureParamsError, "insecure_params"),
    # the plan is ours: a bookkeeping error while running it is a server bug
    (DepthExhaustedError, "internal"),
    (ScaleMismatchError, "internal"),
    (HeinferError, "internal"),
]


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file write, or SQLite's SQLITE_FULL from the database."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


def classify(exc: BaseException) -> ApiError:
    """Any exception -> the ApiError the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, WireError):
        return ApiError(exc.code, str(exc))
    if _disk_full(exc):
        # the server's disk, not the caller's input: one log line, no traceback
        log.error("storage full while handling a request", extra={"error": repr(exc)})
        return ApiError("insufficient_storage", "the server's storage is full; retry later "
                        "(existing sessions keep working)", headers={"Retry-After": "60"})
    for cls, code in EXCEPTIONS:
        if isinstance(exc, cls):
            if PROBLEMS[code].status >= 500:
                log.error("runtime error", exc_info=exc)
                return ApiError(code, f"{type(exc).__name__} while evaluating (logged)")
            return ApiError(code, str(exc))
    log.error("unhandled error", exc_info=exc)
    return ApiError("internal", "internal server error (logged with the request id)")


STATUS_CODES = {401: "invalid_api_key", 403: "admin_required", 404: "not_found",
                405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "validation_error"}


def problem_body(err: ApiError, request_id: str | None) -> dict:
    p = PROBLEMS[err.code]
    return {"type": f"urn:heinfer:problem:{err.code}", "title": p.title, "status": p.status,
            "code": err.code, "detail": err.detail, "request_id": request_id}


def install(app) -> None:
    """Register the handlers that turn every error into problem+json."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from heinfer_server.logs import request_id_var

    def respond(err: ApiError) -> JSONResponse:
        headers = dict(err.headers)
        if err.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return JSONResponse(problem_body(err, request_id_var.get()), status_code=err.status,
                            media_type="application/problem+json", headers=headers)

    async def on_api(_: Request, exc: Exception) -> JSONResponse:
        return respond(classify(exc))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "internal" if exc.status_code >= 500
                                else "malformed_body")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            from heinfer_server.conformance import allowed_methods

            headers["Allow"] = allowed_methods(request)
        return respond(ApiError(code, str(exc.detail), headers=headers))

    async def on_disconnect(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # nobody reads this answer; it keeps a hang-up out of the 5xx counts and tracebacks
        return respond(ApiError("malformed_body", "the client closed the connection before "
                                "its body was complete"))

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg')}")
        return respond(ApiError("validation_error", "; ".join(parts) or "invalid request"))

    app.add_exception_handler(ApiError, on_api)
    app.add_exception_handler(HeinferError, on_api)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
