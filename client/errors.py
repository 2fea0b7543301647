"""Errors the SDK raises. Our exception hierarchy:

    ClientError
    +-- TransportError            the server could not be reached (after retries)
    +-- InsecureSpecError         the model's parameters are below 128-bit security
    |                             (also a heinfer.errors.InsecureParamsError)
    +-- IncompatibleSpecError     the spec needs another HE backend / SEAL version or plan format
    +-- KeystoreError             the local key store is unusable
    +-- ConfigError               the config file is unreadable, invalid or not private
    +-- InputError                an input the model cannot take (dtype, shape, image mode)
    +-- APIError                  the server answered with a problem (status, code, detail)
        +-- AuthError             401, 403: missing, unknown or insufficient API key
        +-- NotFoundError         404: unknown model, session or route
        +-- SessionExpiredError   410: create a new session
        +-- ConflictError         409
        |   +-- PlanChangedError  the model now serves another plan: new keys needed
        +-- PayloadTooLargeError  413
        +-- BadRequestError       400, 415, 422: the request was wrong
        |   +-- SecretKeyRefusedError  the server saw a secret key (the SDK never sends one)
        +-- QuotaExceededError    429
        +-- ServerBusyError       503: queue full or restarting (retried automatically)
        +-- ServerError           other 5xx
            +-- WorkerCrashedError  500 worker_crashed: this request's evaluation killed a
                                    server worker; final (the SDK never retries it)

`APIError.code` is the server's stable problem code (docs/SERVICE.md); branch on it or on the
class, never on the message.
"""

from __future__ import annotations

from heinfer.errors import InsecureParamsError


class ClientError(Exception):
    """Base class of every error the SDK raises on purpose."""


class TransportError(ClientError):
    pass


class InsecureSpecError(ClientError, InsecureParamsError):
    pass


class IncompatibleSpecError(ClientError):
    pass


class KeystoreError(ClientError):
    pass


class ConfigError(ClientError):
    pass


class InputError(ClientError, ValueError):
    pass


class APIError(ClientError):
    def __init__(self, status: int, code: str, detail: str, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {detail}" + (f" (request {request_id})"
                                                         if request_id else ""))
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.retry_after = retry_after


class AuthError(APIError):
    pass


class NotFoundError(APIError):
    pass


class SessionExpiredError(APIError):
    pass


class ConflictError(APIError):
    pass


class PlanChangedError(ConflictError):
    pass


class PayloadTooLargeError(APIError):
    pass


class BadRequestError(APIError):
    pass


class SecretKeyRefusedError(BadRequestError):
    pass


class QuotaExceededError(APIError):
    pass


class ServerBusyError(APIError):
    pass


class ServerError(APIError):
    pass


class WorkerCrashedError(ServerError):
    pass


BY_CODE: dict[str, type[APIError]] = {
    "plan_mismatch": PlanChangedError,
    "secret_key_refused": SecretKeyRefusedError,
    "session_expired": SessionExpiredError,
    "worker_crashed": WorkerCrashedError,
}
BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthError, 403: AuthError, 404: NotFoundError,
    409: ConflictError, 410: SessionExpiredError, 413: PayloadTooLargeError,
    415: BadRequestError, 422: BadRequestError, 429: QuotaExceededError, 503: ServerBusyError,
}


def from_problem(status: int, body: dict | None, retry_after: float | None = None) -> APIError:
    """The most specific APIError for a problem+json answer (or a bare status)."""
    body = body or {}
    code = str(body.get("code") or f"http_{status}")
    detail = str(body.get("detail") or body.get("title") or "no detail")
    cls = BY_CODE.get(code) or BY_STATUS.get(status) or (ServerError if status >= 500
                                                         else APIError)
    return cls(status, code, detail, body.get("request_id"), retry_after)
