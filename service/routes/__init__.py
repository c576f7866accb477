"""All HTTP routes, one module per resource, combined into `api_router`."""

from fastapi import APIRouter

from service.routes import adapters, conversations, feedback, health, jobs, memories, openai_proxy

api_router = APIRouter()
for _module in (feedback, conversations, memories, adapters, jobs, health, openai_proxy):
    api_router.include_router(_module.router)

__all__ = ["api_router"]
