"""Predict: the session's keys + ciphertexts in the model's input layout -> output ciphertexts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from heinfer import wire
from heinfer_server import workers
from heinfer_server.api.deps import ApiKeyDep, StateDep
from heinfer_server.api.routes.models import get_model_or_404
from heinfer_server.api.schemas import binary_body, problems
from heinfer_server.bodies import (
    BINARY,
    declared_length,
    read_limited,
    require_binary,
    wire_gate,
)
from heinfer_server.errors import ApiError
from heinfer_server.shred import ram_spill_dir, shred

# Bodies above this go to the worker as a file in RAM (/dev/shm when there is one): writing
# 1.4 MB through the pool's pipe cost the API process more CPU than a memory copy. The folder
# is the data directory's own (shred.ram_spill_dir): a refused body is shredded, and the next
# start shreds what a kill -9 left.
SPILL_BYTES = 256 * 1024


def spill_body(body: bytes | bytearray, spill_dir: Path | None) -> str | None:
    if len(body) < SPILL_BYTES or spill_dir is None:
        return None
    try:
        fd, path = tempfile.mkstemp(prefix="heinfer-body-", dir=spill_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
    except OSError:  # a full /dev/shm: the pipe still works
        return None
    return path


router = APIRouter(prefix="/models", tags=["predict"])


@router.post(
    "/{name}/predict",
    response_class=Response,
    openapi_extra=binary_body("input ciphertexts: heinfer wire CIPHERTEXTS with exactly "
                              "limits.input_ciphertexts items, in the spec's input layout"),
    responses={200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
                     "description": "output ciphertexts, heinfer wire CIPHERTEXTS"},
               **problems(400, 401, 404, 409, 410, 413, 415, 429, 500, 503, 504)},
)
async def predict(
    name: str, request: Request, state: StateDep, principal: ApiKeyDep,
    session_id: Annotated[str, Query(description="from POST /v1/sessions")],
    plan_hash: Annotated[str | None, Query(description="plan hash the client's keys were "
                                                       "made for")] = None,
) -> Response:
    """Evaluate the model on encrypted input. No side effects: safe to retry."""
    model = get_model_or_404(state, name)
    session = state.owned_session(principal, session_id)
    if session.model != model.name:
        raise ApiError("session_model_mismatch", f"session {session_id} holds keys for model "
                       f"{session.model!r}, not {name!r}")
    if plan_hash is not None and plan_hash != model.plan_hash:
        raise ApiError("plan_mismatch", f"client pinned plan {plan_hash}; model {name} now "
                       f"serves plan {model.plan_hash}")
    if session.plan_hash != model.plan_hash:
        raise ApiError("plan_mismatch", f"session {session_id} has keys for plan "
                       f"{session.plan_hash}; model {name} now serves plan {model.plan_hash}: "
                       "fetch the spec and create a new session")
    plan_path = state.plan_files(model)
    key_dir = state.session_keys(session)
    require_binary(request)
    item_limit = state.ciphertext_limit(model)
    gate = wire_gate(declared_length(request), kind=wire.Kind.CIPHERTEXTS,
                     count=model.n_inputs, max_item_bytes=item_limit)
    # no upload slot: a predict body is small and bounded, its work by the queue (a burst of
    # one key's predicts gets 503 + Retry-After, which clients retry)
    body = await read_limited(request, state.predict_body_limit(model), "predict body", gate)
    state.metrics.bytes_in.labels("/v1/models/{name}/predict").inc(len(body))
    wire.parse_header(body, expected_kind=wire.Kind.CIPHERTEXTS, expected_count=model.n_inputs,
                      max_item_bytes=item_limit)
    body_path = spill_body(body, ram_spill_dir(state.store.data_dir))
    job = workers.PredictJob(model.name, str(plan_path), model.plan_hash, session.id,
                             str(key_dir),
                             b"" if body_path else body, model.n_inputs, item_limit,
                             body_path=body_path, owner=principal.id)
    try:
        out, seconds, cached = await state.pool.run(
            workers.predict, job, timeout=state.settings.request_timeout_s,
            tenant=principal.id, affinity=session.id)
    except BaseException:
        if body_path:
            shred(body_path)  # may be a refused one (a secret key)
        raise
    if body_path:
        os.unlink(body_path)
    state.metrics.he_seconds.labels(model.name).observe(seconds)
    state.metrics.key_cache.labels("hit" if cached else "miss").inc()
    state.metrics.bytes_out.labels("/v1/models/{name}/predict").inc(len(out))
    state.touch_session(session.id)
    return Response(out, media_type=BINARY,
                    headers={"X-Heinfer-Eval-Ms": f"{seconds * 1e3:.2f}"})
