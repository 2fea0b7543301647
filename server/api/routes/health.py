"""Liveness (the process answers) and readiness (workers started, models loaded, DB usable)."""

from __future__ import annotations

from fastapi import APIRouter

from heinfer_server import store as st
from heinfer_server.api.deps import StateDep
from heinfer_server.api.schemas import Health, problems
from heinfer_server.errors import ApiError

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Health, response_model_exclude_none=True)
async def live() -> Health:
    return Health(status="alive")


@router.get("/ready", response_model=Health, responses=problems(503))
async def ready(state: StateDep) -> Health:
    if state.startup_error:
        raise ApiError("not_ready", f"start-up failed: {state.startup_error}")
    if not state.pool.ready or not state.preload_done:
        raise ApiError("not_ready", "worker processes are starting")
    n = len(st.list_models(state.store))  # also proves the database answers
    return Health(status="ready", workers=state.pool.workers, models=n,
                  queue_depth=state.pool.pending)
