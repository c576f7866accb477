"""The REST API's routes, one module per resource, combined into `api_router` (the OpenAI
gateway's are service.inference.routes, the dashboard's service.dashboard)."""

from typing import Any

from fastapi import APIRouter

from service.api.routes import adapters, conversations, feedback, health, jobs, memories
from service.api.schemas import ErrorResponse

# The answers every authenticated loraloop route can give besides its success (OpenAPI document).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Body is not decodable JSON",
        401: "Missing or invalid bearer token",
        403: "The token lacks the route's scope",
        404: "No such resource",
        409: "Conflicts with the stored state (idempotency key reuse, rollback target...)",
        413: "Body over LORALOOP_MAX_BODY_BYTES",
        422: "Invalid request; `error.field` names the field",
        503: "Database unavailable; retry later",
    }.items()
}

api_router = APIRouter()
for _module in (feedback, conversations, memories, adapters, jobs):
    api_router.include_router(_module.router, responses=ERROR_RESPONSES)
api_router.include_router(health.router)

__all__ = ["api_router"]
