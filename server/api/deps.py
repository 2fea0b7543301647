"""Typed dependencies: `StateDep`, `ApiKeyDep` (any valid key), `AdminDep` (the admin key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from heinfer_server.errors import ApiError
from heinfer_server.state import Principal, ServerState

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def get_state(request: Request) -> ServerState:
    return request.app.state.heinfer


StateDep = Annotated[ServerState, Depends(get_state)]


def get_principal(request: Request, state: StateDep,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                  ) -> Principal:
    """The caller's key, throttled: wrong keys per client address, requests per key
    (server/limits.py)."""
    if creds is None or not creds.credentials:
        raise ApiError("missing_api_key", "send your API key as `Authorization: Bearer <key>`")
    address = request.client.host if request.client else "unknown"
    state.limiter.check_address(address)
    principal = state.authenticate(creds.credentials)
    if principal is None:
        state.limiter.record_bad_key(address)
        raise ApiError("invalid_api_key", "this API key is not known to the server")
    state.limiter.check_rate(principal.id)
    return principal


ApiKeyDep = Annotated[Principal, Depends(get_principal)]


def get_admin(principal: ApiKeyDep) -> Principal:
    if principal.role != "admin":
        raise ApiError("admin_required", "adding and removing models needs the admin key")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]
