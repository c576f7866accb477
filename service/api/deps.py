"""FastAPI dependencies: settings, a database session per request, and scope checks.

`SessionDep` commits when the endpoint returns (before the response is sent, so a 2xx always
means the data is durable) and rolls back on any error; GET/HEAD requests get a read-only session
(on SQLite it does not take the write lock). `require(scope)` is the one way a route
declares the scope it needs; `AuthenticatedRoute` checks it before the body is read, and
`PrincipalDep` hands the authenticated token to the route, which applies its namespace grant
with service.api.auth's `ensure_may_write` (403) and `ensure_may_see` (404). Knows nothing
about individual routes or tables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Response, Security
from fastapi.params import Depends as DependsParam
from fastapi.params import Security as SecurityParam
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import check_database_file
from service.api.auth import ANONYMOUS_ADMIN, Principal, TokenSource, bearer_token
from service.api.errors import Forbidden, Unauthenticated
from service.api.metrics import ServiceMetrics
from service.config import Settings


# The cheap dependencies are `async def`: FastAPI runs a sync dependency in the threadpool, one
# thread hand-off per dependency per request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


READ_ONLY_METHODS = frozenset({"GET", "HEAD"})


def get_session(request: Request) -> Iterator[Session]:
    state = request.app.state
    factory: sessionmaker[Session] = state.session_factory
    if request.method in READ_ONLY_METHODS:
        factory = getattr(state, "read_session_factory", None) or factory
    session = factory()
    try:
        yield session
        session.commit()
        check_database_file(session.get_bind())  # the commit is in the file a restart will open
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
# scope="function": the session is committed and closed as soon as the endpoint returns, before
# the response goes out; a client that got a 2xx can rely on the write being committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# auto_error=False: a missing or malformed header is answered by `authorize` (401 in our JSON shape).
# The scheme also puts each route's scope into the OpenAPI document (`security`).
bearer_scheme = HTTPBearer(
    auto_error=False, description="`Authorization: Bearer <token>`; see LORALOOP_AUTH_TOKENS."
)


async def authorize(
    security_scopes: SecurityScopes,
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The caller's principal when it holds every scope the route declared (401/403 otherwise).
    The token `AuthenticatedRoute` authenticated for this request already is not looked up again."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None and all(principal.allows(scope) for scope in security_scopes.scopes):
        return principal
    return authorize_scopes(request, security_scopes.scopes)


def authorize_scopes(request: Request, scopes: list[str]) -> Principal:
    """`authorize` for an explicit list of scopes."""
    settings: Settings = request.app.state.settings
    if settings.auth_disabled:
        request.state.principal = ANONYMOUS_ADMIN
        return ANONYMOUS_ADMIN
    table: TokenSource = request.app.state.token_table
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
    principal = table.authenticate(token)
    if principal is None:
        raise Unauthenticated("invalid bearer token")
    missing = [scope for scope in scopes if not principal.allows(scope)]
    if missing:
        raise Forbidden(f"the token lacks the scope {missing[0]!r}")
    request.state.principal = principal
    return principal


def principal_of(request: Request) -> Principal:
    """The principal `require(...)` authenticated for this request (routes with a scope only)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
    return principal


async def get_principal(request: Request) -> Principal:
    """`principal_of` as a dependency (async: no thread hand-off for a lookup)."""
    return principal_of(request)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(scope: str) -> DependsParam:
    """Route dependency declaring `scope`: `dependencies=[require("feedback:write")]`."""
    return Security(authorize, scopes=[scope])


class AuthenticatedRoute(APIRoute):
    """A route that answers 401/403 before FastAPI reads and parses its body.

    FastAPI parses a JSON body before it solves dependencies, so a malformed body would answer 422
    (with parser details) to a caller without a token. This route class runs the scope check of
    its `require(...)` dependencies first; routes without one (public) are unchanged.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        checks = [
            dependency
            for dependency in self.dependencies
            if isinstance(dependency, SecurityParam) and dependency.dependency is authorize
        ]
        if not checks:
            return handler
        scopes = [scope for check in checks for scope in check.scopes or ()]

        async def authenticate_first(request: Request) -> Response:
            authorize_scopes(request, scopes)
            return await handler(request)

        return authenticate_first


def public() -> None:
    """Marker dependency of the routes that deliberately need no token (health, readiness, metrics)."""


PUBLIC = Depends(public)
