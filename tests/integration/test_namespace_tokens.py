"""Tokens bound to namespaces, on SQLite and PostgreSQL, over every scoped route of the app.

The operations are enumerated from `app.routes` (test_auth_matrix.api_operations), so a new route
fails here until it says how it treats namespaces. Each runs with the token of its own scope, bound
either to one namespace (`ns:team-a`) or to a pattern (`ns:support-*`), against four targets: the
own namespace, another one, a pattern match and a pattern miss. Writes that name another namespace
are 403 naming it; records of another namespace read as absent (the 404 of a missing row, same
body); lists, `/v1/models` and jobs show only the token's namespaces; the gateway neither serves
nor creates another namespace's alias. Also: the audit label of each write, and tokens rotated by
editing the token file of a running server process.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from memory_store.queue import JobQueue
from memory_store.repositories import (
    AdapterRepository,
    ConversationRepository,
    FeedbackRepository,
    MemoryRepository,
)
from service.app import create_app
from service.config import SCOPES, Settings
from tests.integration.test_auth_matrix import api_operations
from tests.integration.test_uvicorn_crash import ServerProcess, free_port

pytestmark = pytest.mark.integration

OWN, OTHER, MATCH, MISS = "team-a", "team-b", "support-eu", "supportive"
NAMESPACES = (OWN, OTHER, MATCH, MISS)
SCOPED = [scope for scope in SCOPES if scope != "admin"]
USER = {"role": "user", "content": "Which port does the billing service listen on?"}
ASSISTANT = {"role": "assistant", "content": "8080."}


def exact_token(scope: str) -> str:
    return f"exact-{scope.replace(':', '-')}-0123456789abcdef"


def pattern_token(scope: str) -> str:
    return f"pattern-{scope.replace(':', '-')}-0123456789abcdef"


def token_spec() -> str:
    entries = []
    for scope in SCOPED:
        entries.append(f"{exact_token(scope)}={scope} ns:{OWN} label:exact-{scope.replace(':', '-')}")
        entries.append(f"{pattern_token(scope)}={scope} ns:support-* label:pattern-{scope.replace(':', '-')}")
    entries.append("global-admin-0123456789=admin ns:team-a label:admin")  # admin stays global
    entries.append("global-reader-0123456789=feedback:read adapters:read inference label:everyone")
    return ",".join(entries)


@dataclass(frozen=True)
class Seeded:
    """Ids of the records seeded in each namespace."""

    feedback: dict[str, int]
    conversation: dict[str, int]
    memory: dict[str, int]
    job: dict[str, int]


def seed(app: FastAPI) -> Seeded:
    ids: dict[str, dict[str, int]] = {"feedback": {}, "conversation": {}, "memory": {}, "job": {}}
    with app.state.session_factory.begin() as session:
        for namespace in NAMESPACES:
            conversation = ConversationRepository(session).add(
                namespace=namespace, messages=[USER, ASSISTANT]
            )
            item, _ = FeedbackRepository(session).add(
                namespace=namespace, messages=[USER, ASSISTANT], target_index=1, continuation="9090."
            )
            memory = MemoryRepository(session).add(namespace=namespace, content="Billing moved to 9090.")
            job = JobQueue(session).enqueue(
                kind="train", namespace=namespace, payload={"namespace": namespace}
            )
            adapters = AdapterRepository(session)
            adapters.ensure_adapter(name=namespace, base_model="base")
            adapters.add_version(name=namespace, version=0, path=f"/nowhere/{namespace}/v0", sha256="0" * 64)
            adapters.set_current(name=namespace, version=0)
            session.flush()
            ids["feedback"][namespace] = item.id
            ids["conversation"][namespace] = conversation.id
            ids["memory"][namespace] = memory.id
            ids["job"][namespace] = job.id
    return Seeded(**ids)


# How each scoped operation meets a namespace: `write` names it in the body or path (403 when
# refused), `record` reaches a record of it by id or name (404 when refused), `list` filters.
Request = tuple[str, dict[str, Any] | None]  # (path, JSON body)


def feedback_body(namespace: str) -> dict[str, Any]:
    return {"namespace": namespace, "messages": [USER], "continuation": "9090."}


OPERATIONS: dict[tuple[str, str], tuple[str, Callable[[str, Seeded], Request]]] = {
    ("POST", "/feedback"): ("write", lambda ns, s: ("/feedback", feedback_body(ns))),
    ("POST", "/feedback:batch"): ("write", lambda ns, s: ("/feedback:batch", {"items": [feedback_body(ns)]})),
    ("GET", "/feedback/{feedback_id}"): ("record", lambda ns, s: (f"/feedback/{s.feedback[ns]}", None)),
    ("GET", "/feedback"): ("list", lambda ns, s: (f"/feedback?namespace={ns}", None)),
    ("POST", "/conversations"): (
        "write",
        lambda ns, s: ("/conversations", {"namespace": ns, "messages": [USER]}),
    ),
    ("GET", "/conversations/{conversation_id}"): (
        "record",
        lambda ns, s: (f"/conversations/{s.conversation[ns]}", None),
    ),
    ("POST", "/memories"): ("write", lambda ns, s: ("/memories", {"namespace": ns, "content": "Port 9090."})),
    ("GET", "/memories"): ("list", lambda ns, s: (f"/memories?namespace={ns}", None)),
    ("GET", "/memories/{memory_id}"): ("record", lambda ns, s: (f"/memories/{s.memory[ns]}", None)),
    ("DELETE", "/memories/{memory_id}"): ("record", lambda ns, s: (f"/memories/{s.memory[ns]}", None)),
    ("POST", "/jobs/train"): ("write", lambda ns, s: ("/jobs/train", {"namespace": ns})),
    ("GET", "/jobs"): ("list", lambda ns, s: (f"/jobs?namespace={ns}", None)),
    ("GET", "/jobs/{job_id}"): ("record", lambda ns, s: (f"/jobs/{s.job[ns]}", None)),
    ("GET", "/adapters"): ("list", lambda ns, s: ("/adapters", None)),
    ("GET", "/adapters/{name}"): ("record", lambda ns, s: (f"/adapters/{ns}", None)),
    ("GET", "/adapters/{name}/versions"): ("record", lambda ns, s: (f"/adapters/{ns}/versions", None)),
    ("GET", "/adapters/{name}/current"): ("record", lambda ns, s: (f"/adapters/{ns}/current", None)),
    ("GET", "/adapters/{name}/versions/{version}"): (
        "record",
        lambda ns, s: (f"/adapters/{ns}/versions/0", None),
    ),
    ("GET", "/adapters/{name}/versions/{version}/download"): (
        "record",
        lambda ns, s: (f"/adapters/{ns}/versions/0/download", None),
    ),
    ("PUT", "/adapters/{name}/versions/{version}/pin"): (
        "write",
        lambda ns, s: (f"/adapters/{ns}/versions/0/pin", {"pinned": True}),
    ),
    ("POST", "/v1/chat/completions"): (
        "record",
        lambda ns, s: ("/v1/chat/completions", {"model": ns, "messages": [USER]}),
    ),
    ("POST", "/v1/completions"): (
        "record",
        lambda ns, s: ("/v1/completions", {"model": ns, "prompt": "Port?"}),
    ),
    ("GET", "/v1/models"): ("list", lambda ns, s: ("/v1/models", None)),
}
ADMIN_ONLY = {("POST", "/adapters/{name}/rollback")}


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> FastAPI:
    from training.tokenizer_files import tokenizer_dir

    settings = Settings(
        _env_file=None,
        database_url=db_url,
        data_dir=tmp_path / "var",
        auth_tokens=token_spec(),
        tokenizer=tokenizer_dir("qwen2"),
        train_debounce_s=3600,
    )
    return create_app(settings, start_background=False)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def listed_namespaces(path: str, body: Any) -> set[str]:
    if path.startswith("/adapters"):
        return {adapter["name"] for adapter in body["adapters"]}
    if path.startswith("/v1/models"):
        return {model["id"] for model in body["data"]}
    return {item["namespace"] for item in body["items"]}


def test_every_scoped_route_applies_the_token_namespaces(app: FastAPI, client: TestClient) -> None:
    seeded = seed(app)
    operations = api_operations(app)
    enumerated = {(method, path) for method, path, scope in operations if scope not in (None, "admin")}
    assert enumerated == set(OPERATIONS), (
        f"say how these routes treat namespaces: {enumerated ^ set(OPERATIONS)}"
    )
    assert {(m, p) for m, p, scope in operations if scope == "admin"} == ADMIN_ONLY
    checked = 0
    for method, template, scope in operations:
        if (method, template) not in OPERATIONS:
            continue
        kind, build = OPERATIONS[(method, template)]
        for token, allowed, refused in (
            (exact_token(scope), OWN, OTHER),  # own namespace / another one
            (pattern_token(scope), MATCH, MISS),  # pattern match / pattern miss
        ):
            path, body = build(allowed, seeded)
            answer = client.request(method, path, json=body, headers=bearer(token))
            assert answer.status_code not in (401, 403, 404), (method, path, token, answer.text)
            if kind == "list":
                shown = listed_namespaces(path, answer.json())
                assert allowed in shown and shown <= {allowed}, (method, path, shown)

            path, body = build(refused, seeded)
            answer = client.request(method, path, json=body, headers=bearer(token))
            if kind == "write":
                assert answer.status_code == 403, (method, path, token, answer.text)
                error = answer.json()["error"]
                assert error["type"] == "forbidden" and repr(refused) in error["message"], error
            elif kind == "record":
                assert answer.status_code == 404, (method, path, token, answer.text)
                # exactly what a caller allowed everywhere gets for a row that does not exist
                missing_path, missing_body = build(refused, seeded)
                missing_path = missing_path.replace(f"/{refused}", "/nonexistent").replace(
                    str(_record_id(seeded, template, refused)), "999999"
                )
                if isinstance(missing_body, dict) and "model" in missing_body:
                    missing_body = {**missing_body, "model": "nonexistent"}
                missing = client.request(method, missing_path, json=missing_body, headers=bearer(token))
                expected = missing.json()["error"]
                expected_message = (
                    expected["message"]
                    .replace("nonexistent", refused)
                    .replace("999999", str(_record_id(seeded, template, refused)))
                )
                got = answer.json()["error"]
                assert (got["type"], got["message"]) == (expected["type"], expected_message), (got, expected)
            else:
                shown = listed_namespaces(path, answer.json()) if answer.status_code == 200 else set()
                assert refused not in shown, (method, path, shown)
            checked += 1
    assert checked >= 2 * len(OPERATIONS) - 2
    # refused writes stored nothing; the refused alias was not created by the gateway
    with app.state.session_factory() as session:
        assert {item.namespace for item in FeedbackRepository(session).list(limit=1000)} == set(NAMESPACES)
        assert len(MemoryRepository(session).list(namespace=OTHER, state=None)) == 1
        assert [a.name for a in AdapterRepository(session).list_adapters()] == sorted(NAMESPACES)
        assert AdapterRepository(session).get_version(name=OTHER, version=0).pinned is False


def _record_id(seeded: Seeded, template: str, namespace: str) -> int | str:
    for key, table in (
        ("{feedback_id}", seeded.feedback),
        ("{conversation_id}", seeded.conversation),
        ("{memory_id}", seeded.memory),
        ("{job_id}", seeded.job),
    ):
        if key in template:
            return table[namespace]
    return "\0never-in-a-path"


def test_a_fresh_alias_outside_the_grant_is_not_created(app: FastAPI, client: TestClient) -> None:
    answer = client.post(
        "/v1/chat/completions",
        json={"model": "team-b-new", "messages": [USER]},
        headers=bearer(exact_token("inference")),
    )
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "model_not_found"
    with app.state.session_factory() as session:
        assert "team-b-new" not in {a.name for a in AdapterRepository(session).list_adapters()}


def test_global_tokens_and_admin_see_every_namespace(app: FastAPI, client: TestClient) -> None:
    seed(app)
    for token in ("global-reader-0123456789", "global-admin-0123456789"):
        names = {a["name"] for a in client.get("/adapters", headers=bearer(token)).json()["adapters"]}
        assert names == set(NAMESPACES)
        shown = {i["namespace"] for i in client.get("/feedback", headers=bearer(token)).json()["items"]}
        assert shown == set(NAMESPACES)


def test_conversation_of_another_namespace_is_refused_as_before(app: FastAPI, client: TestClient) -> None:
    seeded = seed(app)
    answer = client.post(
        "/feedback",
        json={"namespace": OWN, "conversation_id": seeded.conversation[OTHER], "continuation": "9090."},
        headers=bearer(exact_token("feedback:write")),
    )
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "conversation_id"


def test_each_write_records_the_token_label_never_the_secret(app: FastAPI, client: TestClient) -> None:
    writer, reader = bearer(exact_token("feedback:write")), bearer(exact_token("feedback:read"))
    created = client.post("/feedback", json=feedback_body(OWN), headers=writer).json()
    item = client.get(f"/feedback/{created['id']}", headers=reader).json()
    assert item["created_by"] == "exact-feedback-write"
    batch = client.post("/feedback:batch", json={"items": [feedback_body(OWN)]}, headers=writer).json()
    assert client.get(f"/feedback/{batch['items'][0]['id']}", headers=reader).json()["created_by"] == (
        "exact-feedback-write"
    )
    memory = client.post("/memories", json={"namespace": OWN, "content": "Port 9090."}, headers=writer).json()
    assert memory["created_by"] == "exact-feedback-write"
    retired = client.delete(f"/memories/{memory['id']}", headers=writer).json()
    assert retired["state"] == "retired" and retired["retired_by"] == "exact-feedback-write"
    conversation = client.post("/conversations", json={"namespace": OWN, "messages": [USER]}, headers=writer)
    assert conversation.json()["created_by"] == "exact-feedback-write"
    # (OWN's training job was queued by the feedback above; a namespace without one gets a new job)
    job = client.post(
        "/jobs/train", json={"namespace": MATCH}, headers=bearer(pattern_token("adapters:write"))
    )
    assert job.json()["created_by"] == "pattern-adapters-write"
    for answer in (item, memory, retired, job.json()):
        assert exact_token("feedback:write") not in str(answer)


# --- rotation through the token file, with a real server process ----------------------------------


def digest_line(token: str, grant: str) -> str:
    return f"sha256:{hashlib.sha256(token.encode()).hexdigest()}={grant}\n"


def test_tokens_rotate_without_a_restart(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    token_file.write_text("# rotated by ops\n" + digest_line(old, "adapters:read ns:team-a label:ops-old"))
    server = ServerProcess(f"sqlite:///{tmp_path / 'rotate.db'}", tmp_path, free_port())
    server.env["LORALOOP_AUTH_TOKENS"] = ""
    server.env["LORALOOP_AUTH_TOKENS_FILE"] = str(token_file)
    server.start()
    try:
        adapters = f"{server.url}/adapters"
        assert httpx.get(adapters, headers=bearer(old)).status_code == 200
        assert httpx.get(adapters, headers=bearer(new)).status_code == 401

        token_file.write_text(digest_line(new, "adapters:read ns:team-a label:ops-new"))  # rotate
        removed_at = time.monotonic()
        while httpx.get(adapters, headers=bearer(old)).status_code != 401:
            assert time.monotonic() - removed_at < 1.0, "the removed token still works after a second"
            time.sleep(0.02)
        assert httpx.get(adapters, headers=bearer(new)).status_code == 200

        token_file.write_text("not a token entry\n")  # a broken file keeps the last good tokens
        time.sleep(0.6)
        assert httpx.get(adapters, headers=bearer(new)).status_code == 200
        assert httpx.get(adapters, headers=bearer(old)).status_code == 401
    finally:
        server.stop()


def test_sql_listing_matches_patterns_as_the_token_does(db_session_factory: Any) -> None:
    """Case-sensitive, `_` and `.` literal, `*` any run: the database agrees with service.api.auth."""
    from service.api.auth import TokenTable

    names = ["a_b", "axb", "a_b-eu", "A_b", "team.a", "teamxa", "eu-prod", "eu-prod2"]
    with db_session_factory.begin() as session:
        for name in names:
            AdapterRepository(session).ensure_adapter(name=name)
    for patterns in (["a_b*"], ["team.a"], ["*-prod"], ["a_b", "*.a"], []):
        principal = TokenTable.parse("t=adapters:read " + " ".join(f"ns:{p}" for p in patterns)).authenticate(
            "t"
        )
        with db_session_factory() as session:
            listed = [a.name for a in AdapterRepository(session).list_adapters(namespace_patterns=patterns)]
        if patterns:
            assert principal is not None
            assert listed == sorted(name for name in names if principal.allows_namespace(name)), patterns
        else:
            assert listed == []
