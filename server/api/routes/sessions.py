"""Sessions: a client's evaluation keys for one model, uploaded once, used by many predicts."""

from __future__ import annotations

import logging
import os
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from heinfer import wire
from heinfer_server import recovery, workers
from heinfer_server import store as st
from heinfer_server.api.deps import ApiKeyDep, StateDep
from heinfer_server.api.routes.models import get_model_or_404
from heinfer_server.api.schemas import SessionPublic, binary_body, problems
from heinfer_server.bodies import (
    declared_length,
    require_binary,
    stream_to_file,
    tenseal_context_prefix,
    wire_gate,
)
from heinfer_server.errors import ApiError
from heinfer_server.keycheck import tenseal_context_secret
from heinfer_server.shred import shred, shred_tree
from heinfer_server.state import ServerState, new_session_id

router = APIRouter(prefix="/sessions", tags=["sessions"])
log = logging.getLogger("heinfer.server")


def public(state: ServerState, row: st.SessionRow,
           sections: dict[str, int] | None = None) -> SessionPublic:
    return SessionPublic(session_id=row.id, model=row.model, plan_hash=row.plan_hash,
                         created_at=row.created_at, last_used=row.last_used,
                         expires_at=row.last_used + state.settings.session_idle_ttl_s,
                         key_bytes=row.key_bytes, sections=sections or {})


def refuse_context(f, size: int) -> None:
    """A body that is not wire framing may be a whole TenSEAL context: say what it is."""
    secret = tenseal_context_secret(f, 0, size)
    if secret:
        raise ApiError("secret_key_refused", "this is a TenSEAL context holding a secret key: "
                       "never upload it. Send only the public evaluation keys in heinfer wire "
                       "EVAL_KEYS framing (the SDK does)")
    if secret is False:
        raise ApiError("malformed_keys", "this is a TenSEAL context; send the evaluation keys "
                       "in heinfer wire EVAL_KEYS framing instead")


@router.post("", status_code=201, response_model=SessionPublic,
             openapi_extra=binary_body("evaluation keys: heinfer wire EVAL_KEYS (RELIN_KEYS, "
                                       "GALOIS_KEYS for the spec's rotation steps, optional "
                                       "PUBLIC_KEY); never a secret key"),
             responses=problems(400, 401, 404, 409, 413, 415, 429, 500, 503))
async def create_session(
    request: Request, state: StateDep, principal: ApiKeyDep,
    model: Annotated[str, Query(description="the model these keys are for")],
    plan_hash: Annotated[str | None, Query(description="the plan hash the keys were made "
                                                       "for (refused if the model changed)")]
    = None,
) -> SessionPublic:
    s = state.settings
    row = get_model_or_404(state, model)
    state.plan_files(row)
    if plan_hash is not None and plan_hash != row.plan_hash:
        raise ApiError("plan_mismatch", f"keys made for plan {plan_hash}, model {model} now "
                       f"serves plan {row.plan_hash}: fetch the spec and make new keys")
    n, used = st.owner_usage(state.store, owner=principal.id)
    if n >= s.max_sessions_per_key:
        raise ApiError("quota_exceeded", f"this API key has {n} sessions (limit "
                       f"{s.max_sessions_per_key}); delete one or let it expire")
    room = s.max_bytes_per_key - used

    def over_quota(size: int) -> ApiError:
        return ApiError("quota_exceeded", f"{size:,} more key bytes would exceed this API "
                        f"key's storage quota ({s.max_bytes_per_key:,} bytes, {used:,} used)")

    declared = declared_length(request)
    if declared is not None and declared <= s.max_key_bytes and declared > room:
        raise over_quota(declared)
    require_binary(request)
    state.limiter.check_disk(state.store.data_dir, min(declared or 0, s.max_key_bytes))
    gate = wire_gate(declared, kind=wire.Kind.EVAL_KEYS, max_item_bytes=s.max_key_bytes,
                     room=room, unframed=tenseal_context_prefix)
    sid = new_session_id()
    upload = state.store.tmp / f"{sid}.upload"
    staged = state.store.tmp / sid
    try:
        async with state.limiter.upload(principal.id):
            size = await stream_to_file(request, upload, s.max_key_bytes,
                                        "evaluation key upload", gate, (room, over_quota))
        state.metrics.bytes_in.labels("/v1/sessions").inc(size)
        with open(upload, "rb") as f:
            try:
                frame = wire.read_header(f, size, expected_kind=wire.Kind.EVAL_KEYS,
                                         max_item_bytes=s.max_key_bytes)
            except wire.WireError:
                refuse_context(f, size)
                raise
        job = workers.KeyJob(str(upload), tuple((x.type.name, x.offset, x.length)
                                                 for x in frame.sections),
                             str(staged), str(state.store.path(row.plan_path)), row.plan_hash,
                             sid, owner=principal.id)
        sections = await state.pool.run(workers.validate_keys, job, timeout=s.setup_timeout_s,
                                         tenant=principal.id, affinity=sid)
        upload.unlink()
        # the row's fields next to the keys: a lost database can be rebuilt (recovery.adopt)
        recovery.write_sidecar(staged, {"id": sid, "owner": principal.id, "model": model,
                                        "plan_hash": row.plan_hash,
                                        "key_bytes": sum(sections.values()),
                                        "created_at": time.time()})
        key_dir = state.store.data_dir / "sessions" / sid
        os.replace(staged, key_dir)  # complete on disk before the row that points to it
        created = st.create_session(state.store, session_id=sid, owner=principal.id,
                                    model=model, plan_hash=row.plan_hash,
                                    key_dir=str(key_dir.relative_to(state.store.data_dir)),
                                    key_bytes=sum(sections.values()),
                                    max_sessions=s.max_sessions_per_key,
                                    max_bytes=s.max_bytes_per_key)
        if created is None:
            st.remove_tree(key_dir)
            raise ApiError("quota_exceeded", "this API key's session or storage quota is "
                           "used up; delete a session or let one expire")
    finally:  # a refused upload may hold a secret key: overwrite, then delete
        shred(upload)
        shred_tree(staged)
    state.metrics.sessions.set(st.count_active_sessions(state.store))
    log.info("session created", extra={"session": sid, "model": model,
                                       "principal": principal.id, "key_bytes": created.key_bytes})
    return public(state, created, sections)


@router.get("", response_model=list[SessionPublic], responses=problems(401))
async def list_sessions(state: StateDep, principal: ApiKeyDep) -> list[SessionPublic]:
    """This API key's live sessions."""
    return [public(state, r) for r in st.list_sessions(state.store, owner=principal.id)]


@router.get("/{session_id}", response_model=SessionPublic, responses=problems(401, 404, 410))
async def get_session(session_id: str, state: StateDep, principal: ApiKeyDep) -> SessionPublic:
    return public(state, state.owned_session(principal, session_id))


@router.delete("/{session_id}", status_code=204, responses=problems(401, 404, 410))
async def delete_session(session_id: str, state: StateDep, principal: ApiKeyDep) -> Response:
    """Delete a session and its keys now (otherwise they expire when idle)."""
    row = state.owned_session(principal, session_id)
    st.delete_session(state.store, session_id=row.id)
    st.remove_tree(state.store.path(row.key_dir))
    state.metrics.sessions.set(st.count_active_sessions(state.store))
    return Response(status_code=204)
