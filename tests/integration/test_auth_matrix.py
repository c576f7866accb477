"""Auth on every route of the app, enumerated from `app.routes` (not from the OpenAPI document, so a
route hidden from the schema cannot slip through): each declares exactly one scope, or is on the
explicit public allow-list. Then for every route: no token 401, a token holding every OTHER scope
403, the scope itself (and admin) neither. Also: tokens compared with hmac.compare_digest against
every entry, kept only as digests (`sha256:` entries work), no token or feedback content in INFO
logs, and no CORS header unless configured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

import service.api.auth
from service.api.auth import TokenTable
from service.api.deps import authorize, public
from service.app import create_app
from service.config import SCOPES, Settings

pytestmark = pytest.mark.integration

# Routes that deliberately need no token: liveness, readiness, Prometheus, and FastAPI's own
# documentation of the (already public) API shape.
PUBLIC_API_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
PUBLIC_DOC_ROUTES = {
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
SECRET_CONTENT = "zebra-unicorn-secret-continuation"
# The dashboard's pages authenticate by session cookie (the same tokens, scopes and namespaces);
# tests/integration/test_dashboard.py checks every one of its routes.
DASHBOARD_PREFIX = "/ui"


def token_for(scope: str) -> str:
    return f"tok-{scope.replace(':', '-')}-0123456789abcdef"


def token_without(scope: str) -> str:
    return f"tok-all-but-{scope.replace(':', '-')}-0123456789abcdef"


def token_spec() -> str:
    """One token per scope (stored as `sha256:` digests), and per scope one holding every other
    non-admin scope (plaintext entries: the app must still keep only digests)."""
    entries = [f"sha256:{hashlib.sha256(token_for(s).encode()).hexdigest()}={s}" for s in SCOPES]
    for scope in SCOPES:
        others = " ".join(s for s in SCOPES if s not in (scope, "admin"))
        entries.append(f"{token_without(scope)}={others}")
    return ",".join(entries)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    from training.tokenizer_files import tokenizer_dir

    data = tmp_path_factory.mktemp("auth")
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{data / 'auth.db'}",
        data_dir=data / "var",
        auth_tokens=token_spec(),
        tokenizer=tokenizer_dir("qwen2"),
        train_debounce_s=3600,
    )
    return create_app(settings, start_background=False)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def all_routes(app: FastAPI) -> list[Any]:
    """Every route the app serves, with included routers flattened (their effective dependencies)."""
    return list(iter_route_contexts(app.routes))


def declared_scopes(route: Any) -> tuple[list[str], bool]:
    """(scopes the route's `authorize` dependencies require, whether it carries the PUBLIC marker)."""
    scopes: list[str] = []
    is_public = False
    stack = list(route.dependant.dependencies)
    while stack:
        dependant = stack.pop()
        if dependant.call is authorize:
            scopes.extend(dependant.own_oauth_scopes or [])
        if dependant.call is public:
            is_public = True
        stack.extend(dependant.dependencies)
    return scopes, is_public


def api_operations(app: FastAPI) -> list[tuple[str, str, str | None]]:
    operations = []
    for route in all_routes(app):
        if not isinstance(route.original_route, APIRoute):
            continue
        if route.path == DASHBOARD_PREFIX or route.path.startswith(DASHBOARD_PREFIX + "/"):
            continue
        scopes, is_public = declared_scopes(route)
        for method in sorted(route.methods):
            key = (method, route.path)
            if key in PUBLIC_API_ROUTES:
                assert is_public and not scopes, f"{key} is on the public list but declares {scopes}"
                operations.append((method, route.path, None))
                continue
            assert not is_public, f"{key} is marked public but is not on the allow-list"
            assert len(set(scopes)) == 1, f"{key} must declare exactly one scope, declares {scopes}"
            assert scopes[0] in SCOPES, (key, scopes)
            operations.append((method, route.path, scopes[0]))
    return operations


def example_path(template: str) -> str:
    values = {
        "name": "geo",
        "version": "0",
        "feedback_id": "1",
        "conversation_id": "1",
        "memory_id": "1",
        "job_id": "1",
    }
    path = template
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    assert "{" not in path, f"no example value for a parameter of {template}"
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_is_scoped_or_explicitly_public(app: FastAPI) -> None:
    operations = api_operations(app)
    assert len(operations) >= 20
    assert {(m, p) for m, p, scope in operations if scope is None} == PUBLIC_API_ROUTES
    others = {
        (method, route.path)
        for route in all_routes(app)
        if not isinstance(route.original_route, APIRoute)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert others == PUBLIC_DOC_ROUTES, "a non-API route appeared: give it a scope or allow-list it"
    used = {scope for _, _, scope in operations if scope is not None}
    assert used == set(SCOPES), f"scopes without a route, or unknown: {used ^ set(SCOPES)}"


def test_no_token_401_missing_scope_403_scope_passes(app: FastAPI, client: TestClient) -> None:
    checked = 0
    for method, template, scope in api_operations(app):
        path = example_path(template)
        if scope is None:
            assert client.request(method, path).status_code not in (401, 403), (method, path)
            continue
        for headers in ({}, bearer("not-a-configured-token"), {"Authorization": token_for(scope)}):
            anonymous = client.request(method, path, headers=headers)
            assert anonymous.status_code == 401, (method, path, headers, anonymous.text)
            assert anonymous.headers["WWW-Authenticate"] == "Bearer"
            assert anonymous.json()["error"]["type"] == "unauthenticated"
        lacking = client.request(method, path, headers=bearer(token_without(scope)))
        assert lacking.status_code == 403, (method, path, lacking.text)
        assert lacking.json()["error"]["type"] == "forbidden" and scope in lacking.json()["error"]["message"]
        for token in (token_for(scope), token_for("admin")):
            allowed = client.request(method, path, headers=bearer(token))
            assert allowed.status_code not in (401, 403), (method, path, token, allowed.text)
        checked += 1
    assert checked >= 17


def test_every_token_entry_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.api.auth.hmac, "compare_digest", counting)
    table = TokenTable.parse(token_spec())
    for presented in (token_for("feedback:write"), token_for("inference"), "nope"):
        calls.clear()
        principal = table.authenticate(presented)
        # the first entry matching does not stop the scan: the time does not depend on which one
        assert len(calls) == len(table)
        assert all(len(a) == len(b) == 32 for a, b in calls)
        assert (principal is None) == (presented == "nope")


def test_only_digests_are_kept(app: FastAPI, client: TestClient) -> None:
    table = app.state.token_table
    held = repr(vars(table))
    for scope in SCOPES:
        assert token_for(scope) not in held and token_without(scope) not in held
        assert token_for(scope).encode() not in held.encode()
    # a `sha256:` entry authenticates without the secret ever being configured
    assert client.get("/adapters", headers=bearer(token_for("adapters:read"))).status_code == 200
    assert table.authenticate(hashlib.sha256(token_for("admin").encode()).hexdigest()) is None


def _request_everything(app: FastAPI, client: TestClient, token: str) -> None:
    body = {
        "messages": [{"role": "user", "content": SECRET_CONTENT}],
        "continuation": SECRET_CONTENT,
        "reason": SECRET_CONTENT,
        "namespace": "geo",
    }
    client.post("/feedback", json=body, headers=bearer(token))
    client.post("/feedback", json={**body, "target_index": 7}, headers=bearer(token))  # 422
    client.post(
        "/feedback:batch", json={"items": [body, {**body, "continuation": " "}]}, headers=bearer(token)
    )
    client.post("/feedback", json=body, headers=bearer(token + "x"))  # 401
    client.post("/memories", json={"content": SECRET_CONTENT, "namespace": "geo"}, headers=bearer(token))
    client.post("/conversations", json={"messages": body["messages"]}, headers=bearer(token))
    client.post(
        "/v1/chat/completions", json={"model": "geo", "messages": body["messages"]}, headers=bearer(token)
    )
    for method, template, _scope in api_operations(app):
        client.request(method, example_path(template), headers=bearer(token))


def test_info_logs_hold_no_token_and_no_feedback_content(
    app: FastAPI, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    admin = token_for("admin")
    with caplog.at_level(logging.INFO):  # the root logger at INFO, as `loraloop serve` configures it
        _request_everything(app, client, admin)
    assert caplog.records, "nothing was logged: the capture is not working"
    logged = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
        if record.levelno >= logging.INFO
    )
    assert admin not in logged
    assert SECRET_CONTENT not in logged


def test_cors_is_off_by_default(client: TestClient) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = client.options("/feedback", headers={**origin, "Access-Control-Request-Method": "POST"})
    simple = client.get("/adapters", headers={**origin, **bearer(token_for("adapters:read"))})
    health = client.get("/healthz", headers=origin)
    for response in (preflight, simple, health):
        assert not any(h.lower().startswith("access-control-") for h in response.headers), response.headers


def test_cors_only_for_the_configured_origins(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'cors.db'}",
        data_dir=tmp_path,
        auth_tokens=token_spec(),
        tokenizer=tmp_path / "none",
        cors_origins="https://ui.example",
    )
    with TestClient(create_app(settings, start_background=False)) as client:
        request: dict[str, Any] = {"Access-Control-Request-Method": "POST"}
        allowed = client.options("/feedback", headers={"Origin": "https://ui.example", **request})
        refused = client.options("/feedback", headers={"Origin": "https://evil.example", **request})
    assert allowed.headers.get("access-control-allow-origin") == "https://ui.example"
    assert "access-control-allow-origin" not in refused.headers


def test_database_errors_leave_no_feedback_text_in_logs(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing INSERT is logged (ERROR) with neither SQLAlchemy's bound parameters nor
    PostgreSQL's "Failing row contains (...)" detail: both would hold the feedback text."""
    import sqlalchemy as sa

    from memory_store.repositories import FeedbackRepository

    def failing_add(self: FeedbackRepository, **item: Any) -> Any:
        self.session.execute(
            sa.text("INSERT INTO feedback_items (id, namespace, continuation) VALUES (:id, :ns, :text)"),
            {"id": None, "ns": None, "text": item["continuation"]},  # violates NOT NULL
        )
        raise AssertionError("the INSERT should have failed")

    def failing_add_many(self: FeedbackRepository, *, items: Any) -> Any:  # the path of POST /feedback
        return failing_add(self, continuation=items[0].continuation)

    monkeypatch.setattr(FeedbackRepository, "add", failing_add)
    monkeypatch.setattr(FeedbackRepository, "add_many", failing_add_many)
    settings = Settings(
        _env_file=None,
        database_url=db_url,
        data_dir=tmp_path,
        auth_tokens=token_spec(),
        tokenizer=tmp_path / "none",
    )
    body = {"messages": [{"role": "user", "content": "q"}], "continuation": SECRET_CONTENT}
    app = create_app(settings, start_background=False)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.INFO):
        response = client.post("/feedback", json=body, headers=bearer(token_for("admin")))
    assert response.status_code == 500 and SECRET_CONTENT not in response.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "the database error was not logged"
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "feedback_items" in logged  # the statement is there to locate the bug ...
    assert SECRET_CONTENT not in logged  # ... the data is not
