"""The operator's dashboard at `/ui`: server-rendered HTML pages over the registry, the feedback
queue and the jobs, with the admin actions of the API. `router` is included by service.app."""

from service.dashboard.routes import router

__all__ = ["router"]
