"""Models: list, public spec, add (plan files, admin), remove (admin)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from heinfer import wire
from heinfer.names import MODEL_NAME_RE
from heinfer_server import store as st
from heinfer_server import workers
from heinfer_server.api.deps import AdminDep, ApiKeyDep, StateDep
from heinfer_server.api.schemas import Limits, ModelPublic, ModelSummary, problems
from heinfer_server.errors import ApiError
from heinfer_server.state import ServerState

router = APIRouter(prefix="/models", tags=["models"])
NAME_RE = MODEL_NAME_RE  # heinfer.names: the compiler names plans by the same rule


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ApiError("invalid_name", f"model name {name!r} must match {NAME_RE.pattern}")
    return name


def get_model_or_404(state: ServerState, name: str) -> st.ModelRow:
    row = st.get_model(state.store, name=name) if NAME_RE.match(name) else None
    if row is None:
        names = [m.name for m in st.list_models(state.store)]
        raise ApiError("unknown_model", f"no model {name!r}; served: {names}")
    return row


def public(state: ServerState, row: st.ModelRow) -> ModelPublic:
    return ModelPublic(
        name=row.name, plan_hash=row.plan_hash, spec=row.spec, added_at=row.added_at,
        preprocessing=row.preprocessing,
        limits=Limits(input_ciphertexts=row.n_inputs,
                      max_ciphertext_bytes=state.ciphertext_limit(row),
                      max_predict_body_bytes=state.predict_body_limit(row),
                      max_key_bytes=state.settings.max_key_bytes, wire_version=wire.VERSION))


def summary(row: st.ModelRow) -> ModelSummary:
    from heinfer.params import CKKSParams

    params = CKKSParams(**row.spec["params"])
    return ModelSummary(name=row.name, plan_hash=row.plan_hash, params=params.describe(),
                        security_bits=params.security_bits(),
                        input_shape=row.spec["input_shape"], added_at=row.added_at)


@router.get("", response_model=list[ModelSummary], responses=problems(401))
async def list_models(state: StateDep, _: ApiKeyDep) -> list[ModelSummary]:
    return [summary(r) for r in st.list_models(state.store)]


@router.get("/{name}", response_model=ModelPublic, responses=problems(401, 404))
async def get_model(name: str, state: StateDep, _: ApiKeyDep) -> ModelPublic:
    return public(state, get_model_or_404(state, name))


async def install_plan(state: ServerState, json_path, *, name: str | None,
                       replace: bool, force: bool = False) -> tuple[st.ModelRow, bool]:
    """Inspect a plan file pair in a worker, copy it under models/NAME/ and record it.
    Returns (row, created). Re-adding the same plan under the same name is a no-op."""
    info = await state.pool.run(workers.inspect_plan, str(json_path),
                                state.settings.allow_insecure_params, force,
                                timeout=state.settings.setup_timeout_s, queue=False,
                                tenant="admin")
    name = check_name(name or info.name)
    old = st.get_model(state.store, name=name)
    if old is not None and old.plan_hash == info.plan_hash:
        return old, False
    if old is not None and not replace:
        raise ApiError("model_exists", f"model {name!r} is served with plan {old.plan_hash}; "
                       "remove it first or add with replace=true")
    dest = state.store.data_dir / "models" / name
    dest.mkdir(parents=True, exist_ok=True)
    src = str(json_path).removesuffix(".json")
    final = dest / f"{info.plan_hash}.plan"
    for ext in ("npz", "json"):  # complete in place before the row that points to them
        shutil.copyfile(f"{src}.{ext}", f"{final}.{ext}.part")
        os.replace(f"{final}.{ext}.part", f"{final}.{ext}")
    spec = json.loads(info.spec_json)
    spec["name"] = name
    row, replaced = st.put_model(state.store, name=name, plan_hash=info.plan_hash,
                                 plan_path=str(final.relative_to(state.store.data_dir)) + ".json",
                                 spec_json=json.dumps(spec), n_inputs=info.n_inputs,
                                 preprocessing_json=info.preprocessing_json)
    if replaced is not None and replaced.plan_path != row.plan_path:
        old_json = state.store.path(replaced.plan_path)
        old_json.unlink(missing_ok=True)
        (old_json.parent / old_json.name.replace(".json", ".npz")).unlink(missing_ok=True)
    state.metrics.models.set(len(st.list_models(state.store)))
    return row, True


PLAN_UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["plan_json", "plan_npz"],
    "properties": {"plan_json": {"type": "string", "format": "binary",
                                 "description": "NAME.plan.json from Plan.save"},
                   "plan_npz": {"type": "string", "format": "binary",
                                "description": "NAME.plan.npz from Plan.save"}}}}}}}


@router.post("", status_code=201, response_model=ModelPublic, openapi_extra=PLAN_UPLOAD,
             responses=problems(400, 401, 403, 409, 413))
async def add_model(request: Request, response: Response, state: StateDep, principal: AdminDep,
                    name: Annotated[str | None, Query(description="serve under this name "
                                                      "(default: the plan's)")] = None,
                    replace: bool = False,
                    force: Annotated[bool, Query(description="serve a plan without a passed "
                                                 "check record (heinfer.check)")] = False
                    ) -> ModelPublic:
    """Add a compiled model from its plan files (`heinfer models add NAME.plan.json`)."""
    limit = state.settings.max_plan_bytes
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ApiError("malformed_body", "plan uploads need a Content-Length")
    if int(length) > limit:
        raise ApiError("payload_too_large", f"plan upload of {int(length):,} bytes exceeds "
                       f"{limit:,} bytes (HEINFER_MAX_PLAN_BYTES)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError("unsupported_media_type",
                       "send the plan as multipart/form-data with parts plan_json and plan_npz")
    state.limiter.check_disk(state.store.data_dir, 2 * int(length))  # upload + installed copy
    tmp = state.store.tmp / f"plan-{secrets.token_hex(8)}"
    tmp.mkdir()
    try:
        async with (state.limiter.upload(principal.id),
                    request.form(max_files=2, max_fields=2) as form):
            for key, suffix in (("plan_json", "json"), ("plan_npz", "npz")):
                part = form.get(key)
                if part is None or isinstance(part, str):
                    raise ApiError("invalid_plan", f"multipart part {key!r} (a file) is missing")
                with open(tmp / f"upload.plan.{suffix}", "wb") as f:
                    while chunk := await part.read(1 << 20):
                        f.write(chunk)
        row, created = await install_plan(state, tmp / "upload.plan.json", name=name,
                                          replace=replace, force=force)
    finally:
        st.remove_tree(tmp)
    if not created:
        response.status_code = 200
    return public(state, row)


@router.delete("/{name}", status_code=204, responses=problems(401, 403, 404))
async def remove_model(name: str, state: StateDep, _: AdminDep) -> Response:
    """Remove a model, its plan files and every session made for it."""
    get_model_or_404(state, name)
    row, sessions = st.delete_model(state.store, name=name)
    for s in sessions:
        st.remove_tree(state.store.path(s.key_dir))
    if row is not None:
        st.remove_tree(state.store.path(row.plan_path).parent)
    state.metrics.models.set(len(st.list_models(state.store)))
    return Response(status_code=204)
