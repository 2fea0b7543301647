"""The /v1 router: one include per resource module."""

from fastapi import APIRouter

from heinfer_server.api.routes import health, models, predict, sessions

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(models.router)
api_router.include_router(sessions.router)
api_router.include_router(predict.router)
