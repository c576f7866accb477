"""The HTTP API through the ASGI app, on SQLite and on PostgreSQL (the `db_url` fixture).

Covers ingestion (idempotency, batches, every refusal naming its field, nothing partial stored),
conversations, memories, the adapter registry and downloads, jobs, auth on every route, health
and metrics. The real-process counterpart is tests/integration/test_uvicorn_crash.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from memory_store.repositories import AdapterRepository
from service.app import create_app
from service.config import Settings

pytestmark = pytest.mark.integration

WRITER, READER, ADAPTER_READER, ADMIN = "writer-token", "reader-token", "adapters-token", "admin-token"
TOKENS = (
    f"{WRITER}=feedback:write,{READER}=feedback:read,"
    f"sha256:{hashlib.sha256(ADAPTER_READER.encode()).hexdigest()}=adapters:read,{ADMIN}=admin label:ops-admin"
)
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Lyon."}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def item(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [USER, ASSISTANT], "continuation": "Paris.", "namespace": "geo"}
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def qwen2_tokenizer() -> Path:
    from training.tokenizer_files import tokenizer_dir

    return tokenizer_dir("qwen2")


def make_settings(db_url: str, tmp_path: Path, tokenizer: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "data_dir": tmp_path / "var",
        "auth_tokens": TOKENS,
        "tokenizer": tokenizer,
        "max_continuation_tokens": 32,
        "max_body_bytes": 64 * 1024,
        "max_batch_items": 50,
        "max_messages": 16,
        "train_debounce_s": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(db_url: str, tmp_path: Path, qwen2_tokenizer: Path) -> Settings:
    return make_settings(db_url, tmp_path, qwen2_tokenizer)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, start_background=False)) as test_client:
        yield test_client


def stored_count(client: TestClient, **params: Any) -> int:
    response = client.get("/feedback", params={"limit": 500, **params}, headers=bearer(READER))
    assert response.status_code == 200, response.text
    return len(response.json()["items"])


# --- feedback --------------------------------------------------------------------------------------


def test_feedback_is_stored_listed_and_paginated(client: TestClient) -> None:
    ids = []
    for index in range(3):
        response = client.post(
            "/feedback", json=item(continuation=f"Paris ({index})."), headers=bearer(WRITER)
        )
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "pending"
        ids.append(response.json()["id"])
    client.post("/feedback", json=item(namespace="other"), headers=bearer(WRITER))

    stored = client.get(f"/feedback/{ids[0]}", headers=bearer(READER)).json()
    assert stored["messages"] == [USER, ASSISTANT]
    assert stored["continuation"] == "Paris (0)." and stored["namespace"] == "geo"
    assert stored["status"] == "pending" and stored["target_index"] == 1  # the default, resolved

    first = client.get("/feedback", params={"namespace": "geo", "limit": 2}, headers=bearer(READER)).json()
    assert [row["id"] for row in first["items"]] == ids[:2] and first["next_cursor"] is not None
    second = client.get(
        "/feedback",
        params={"namespace": "geo", "limit": 2, "cursor": first["next_cursor"]},
        headers=bearer(READER),
    ).json()
    assert [row["id"] for row in second["items"]] == ids[2:] and second["next_cursor"] is None
    assert stored_count(client, status="trained") == 0
    assert stored_count(client, since=stored["created_at"], namespace="geo") == 3
    assert stored_count(client, since="2999-01-01T00:00:00Z") == 0

    # one debounced train job per namespace, however many items arrived
    jobs = client.get("/jobs", params={"status": "queued"}, headers=bearer(ADAPTER_READER)).json()["items"]
    assert sorted(job["namespace"] for job in jobs if job["kind"] == "train") == ["geo", "other"]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([USER, ASSISTANT], 1),  # last message is an assistant turn: replace it
        ([USER], 1),  # otherwise append
        ([USER, ASSISTANT, {"role": "user", "content": "And of Spain?"}], 3),
    ],
)
def test_default_target_index_is_resolved_and_stored(
    client: TestClient, messages: list[dict[str, str]], expected: int
) -> None:
    accepted = client.post("/feedback", json=item(messages=messages), headers=bearer(WRITER))
    assert accepted.status_code == 202, accepted.text
    stored = client.get(f"/feedback/{accepted.json()['id']}", headers=bearer(READER)).json()
    assert stored["target_index"] == expected


def test_tool_calls_and_tool_messages_are_accepted(client: TestClient) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "18C, sunny"},
    ]
    accepted = client.post(
        "/feedback", json=item(messages=messages, continuation="18C and sunny."), headers=bearer(WRITER)
    )
    assert accepted.status_code == 202, accepted.text
    stored = client.get(f"/feedback/{accepted.json()['id']}", headers=bearer(READER)).json()
    assert stored["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert stored["target_index"] == 3


def test_idempotency_key_replays_and_conflicts(client: TestClient) -> None:
    headers = {**bearer(WRITER), "Idempotency-Key": "req-1"}
    first = client.post("/feedback", json=item(), headers=headers)
    replay = client.post("/feedback", json=item(), headers=headers)
    assert first.status_code == replay.status_code == 202
    assert replay.json() == first.json() and replay.headers["Idempotent-Replayed"] == "true"

    for bad_key in ("", "k" * 201):
        refused = client.post(
            "/feedback", json=item(), headers={**bearer(WRITER), "Idempotency-Key": bad_key}
        )
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "Idempotency-Key"
    longest = {**bearer(WRITER), "Idempotency-Key": "k" * 200}
    batch = client.post(
        "/feedback:batch", json={"items": [item(continuation=f"P{i}.") for i in range(12)]}, headers=longest
    )
    assert batch.status_code == 202, batch.text  # derived keys `<key>#<i>` still fit the column

    clash = client.post("/feedback", json=item(continuation="Marseille."), headers=headers)
    assert clash.status_code == 409
    assert clash.json()["error"]["type"] == "idempotency_conflict"
    assert clash.json()["error"]["field"] == "Idempotency-Key"
    assert stored_count(client) == 13


def test_batch_is_all_or_nothing_and_idempotent(client: TestClient) -> None:
    good = [item(continuation=f"Paris {i}.") for i in range(3)]
    bad = [*good[:2], item(target_index=0)]
    response = client.post("/feedback:batch", json={"items": bad}, headers=bearer(WRITER))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "items[2].target_index"
    assert stored_count(client) == 0

    headers = {**bearer(WRITER), "Idempotency-Key": "batch-7"}
    accepted = client.post("/feedback:batch", json={"items": good}, headers=headers)
    assert accepted.status_code == 202, accepted.text
    ids = [entry["id"] for entry in accepted.json()["items"]]
    assert len(set(ids)) == 3
    replay = client.post("/feedback:batch", json={"items": good}, headers=headers)
    assert [entry["id"] for entry in replay.json()["items"]] == ids
    assert stored_count(client) == 3

    too_many = client.post("/feedback:batch", json={"items": [item()] * 51}, headers=bearer(WRITER))
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "items"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (item(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (item(target_index=5), "target_index"),
        (item(target_index=0), "target_index"),
        (item(target_index=-1), "target_index"),
        (item(target_index=2**40), "target_index"),
        (item(continuation="   \n"), "continuation"),
        (item(continuation="word " * 200), "continuation"),  # > max_continuation_tokens (32)
        (item(continuation="nul\x00byte"), "continuation"),
        (item(conversation_id=987654), "conversation_id"),
        (item(messages=[USER, ASSISTANT] * 9), "messages"),  # > max_messages (16)
        (item(namespace="../../etc"), "namespace"),
        (item(unexpected="field"), "unexpected"),
        ({"messages": [USER], "namespace": "geo"}, "continuation"),
    ],
)
def test_bad_feedback_gets_422_naming_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/feedback", json=body, headers=bearer(WRITER))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert error["message"]
    assert stored_count(client) == 0


def test_malformed_and_oversized_bodies(client: TestClient) -> None:
    headers = {**bearer(WRITER), "Content-Type": "application/json"}
    too_big = client.post("/feedback", content=b"{" + b" " * 70_000 + b"}", headers=headers)
    assert too_big.status_code == 413
    assert too_big.json()["error"] == {
        "type": "body_too_large",
        "message": "request body exceeds the limit of 65536 bytes",
        "field": "body",
        "limit_bytes": 65536,
    }

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        yield b'{"continuation": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    streamed = client.post("/feedback", content=chunks(), headers=headers)
    assert streamed.status_code == 413 and streamed.json()["error"]["limit_bytes"] == 65536

    nan_arguments = (
        b'{"namespace": "geo", "continuation": "x", "messages": [{"role": "user", "content": "q"}, '
        b'{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": {"v": NaN}}}]}]}'
    )
    for payload in (b'{"continuation": "\xff\xfe"}', b"[" * 50_000, b"{not json", b"", nan_arguments):
        response = client.post("/feedback", content=payload, headers=headers)
        assert 400 <= response.status_code < 500, (payload[:20], response.text)
        assert response.json()["error"]["field"], response.text  # "body" or the offending field
    assert stored_count(client) == 0


def test_conversation_ids_feed_feedback(client: TestClient) -> None:
    logged = client.post(
        "/conversations", json={"messages": [USER, ASSISTANT], "namespace": "geo"}, headers=bearer(WRITER)
    )
    assert logged.status_code == 201, logged.text
    conversation_id = logged.json()["id"]
    assert client.get(f"/conversations/{conversation_id}", headers=bearer(READER)).json()["messages"] == [
        USER,
        ASSISTANT,
    ]
    body = {"conversation_id": conversation_id, "continuation": "Paris.", "namespace": "geo"}
    accepted = client.post("/feedback", json=body, headers=bearer(WRITER))
    assert accepted.status_code == 202, accepted.text
    stored = client.get(f"/feedback/{accepted.json()['id']}", headers=bearer(READER)).json()
    assert stored["messages"] == [USER, ASSISTANT] and stored["conversation_id"] == conversation_id

    # the conversation lives in namespace "geo": from another namespace it does not exist
    elsewhere = client.post("/feedback", json={**body, "namespace": "other"}, headers=bearer(WRITER))
    assert elsewhere.status_code == 422 and elsewhere.json()["error"]["field"] == "conversation_id"
    assert client.get("/conversations/424242", headers=bearer(READER)).status_code == 404


def test_memories_add_list_and_retire(client: TestClient) -> None:
    created = [
        client.post(
            "/memories",
            json={"content": f"fact {i}", "namespace": "geo", "priority": i, "tags": ["t"]},
            headers=bearer(WRITER),
        )
        for i in range(2)
    ]
    assert all(response.status_code == 201 for response in created)
    first_id = created[0].json()["id"]
    deleted = client.delete(f"/memories/{first_id}", headers=bearer(WRITER))
    assert deleted.status_code == 200 and deleted.json()["state"] == "retired"
    assert client.delete(f"/memories/{first_id}", headers=bearer(WRITER)).status_code == 200  # idempotent

    active = client.get(
        "/memories", params={"namespace": "geo", "state": "active"}, headers=bearer(READER)
    ).json()
    assert [m["content"] for m in active["items"]] == ["fact 1"]
    everything = client.get("/memories", params={"namespace": "geo"}, headers=bearer(READER)).json()
    assert len(everything["items"]) == 2
    assert client.get("/memories", params={"state": "bogus"}, headers=bearer(READER)).status_code == 422
    assert client.delete("/memories/99999", headers=bearer(WRITER)).status_code == 404


# --- adapters ------------------------------------------------------------------------------------


def publish_versions(settings: Settings, client: TestClient, name: str, count: int) -> list[str]:
    from training.adapter_store import AdapterStore

    store = AdapterStore(settings.adapters_dir)
    digests = []
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    for version in range(count):
        source = settings.data_dir / "src" / f"{name}-{version}"
        source.mkdir(parents=True)
        (source / "adapter_config.json").write_text('{"r": 8}')
        (source / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (version + 3))
        published = store.publish(name, version, source, {"parent_version": version - 1 if version else None})
        with factory.begin() as session:
            repository = AdapterRepository(session)
            repository.ensure_adapter(name=name, base_model="tiny")
            repository.add_version(
                name=name,
                version=version,
                parent_version=version - 1 if version else None,
                path=str(published.path),
                sha256=published.sha256,
                metrics={"nll_before": 2.0, "nll_after": 1.5 - version * 0.1},
            )
            repository.set_current(name=name, version=version)
        digests.append(published.sha256)
    return digests


def test_adapter_registry_download_and_rollback(client: TestClient, settings: Settings) -> None:
    from training.adapter_store import dir_sha256

    digests = publish_versions(settings, client, "geo", 3)
    headers = bearer(ADAPTER_READER)
    listing = client.get("/adapters", headers=headers).json()["adapters"]
    assert [a["name"] for a in listing] == ["geo"] and listing[0]["current"] == 2
    versions = listing[0]["versions"]
    assert [(v["version"], v["status"], v["parent"]) for v in versions] == [
        (0, "retired", None),
        (1, "retired", 0),
        (2, "current", 1),
    ]
    assert versions[1]["metrics"]["nll_after"] == pytest.approx(1.4) and versions[1]["created_at"]
    assert client.get("/adapters/geo", headers=headers).json()["current"] == 2
    assert client.get("/adapters/geo/current", headers=headers).json()["version"] == 2
    assert client.get("/adapters/geo/versions/0", headers=headers).json()["sha256"] == digests[0]
    assert client.get("/adapters/geo/versions/7", headers=headers).status_code == 404
    assert client.get("/adapters/nope", headers=headers).status_code == 404

    download = client.get("/adapters/geo/versions/1/download", headers=headers)
    assert download.status_code == 200
    assert download.headers["X-Adapter-Sha256"] == digests[1]
    assert int(download.headers["Content-Length"]) == len(download.content)
    extracted = settings.data_dir / "extracted"
    with tarfile.open(fileobj=io.BytesIO(download.content)) as archive:
        archive.extractall(extracted, filter="data")
    assert dir_sha256(extracted / "geo" / "v1") == digests[1]

    # a tampered version is neither streamed nor made current
    weights = settings.adapters_dir / "geo" / "v0" / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"tampered")
    assert client.get("/adapters/geo/versions/0/download", headers=headers).status_code == 409
    refused = client.post("/adapters/geo/rollback", json={"version": 0}, headers=bearer(ADMIN))
    assert refused.status_code == 409 and refused.json()["error"]["type"] == "adapter_files_unavailable"
    assert client.get("/adapters/geo/current", headers=headers).json()["version"] == 2

    assert client.post("/adapters/geo/rollback", json={}, headers=headers).status_code == 403
    rolled = client.post("/adapters/geo/rollback", headers=bearer(ADMIN))  # default: the previous one
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["current"] == 1
    assert client.get("/adapters/geo/current", headers=headers).json()["version"] == 1
    # audit: the version rolled back from names the token entry that did it (its label), never the secret
    left = client.get("/adapters/geo/versions/2", headers=headers).json()
    assert left["status"] == "retired" and "by ops-admin" in left["reason"] and ADMIN not in rolled.text


@pytest.mark.parametrize(
    "path",
    [
        "/adapters/..%2F..%2Fetc/versions/1/download",
        "/adapters/%2e%2e/versions/1/download",
        "/adapters/geo%00/versions/1/download",
        "/adapters/%2Fetc%2Fpasswd/versions/1/download",
        "/adapters/geo/versions/-1/download",
        "/adapters/geo/versions/..%2F1/download",
        "/adapters/geo/versions/99999999999999/download",
        "/adapters/a..b/versions/1/download",
    ],
)
def test_adapter_paths_cannot_escape(client: TestClient, path: str) -> None:
    response = client.get(path, headers=bearer(ADAPTER_READER))
    assert response.status_code in (404, 422), response.text
    assert "error" in response.json()


# --- jobs ------------------------------------------------------------------------------------------


def test_train_jobs_are_deduplicated_per_namespace(client: TestClient) -> None:
    first = client.post("/jobs/train", json={"namespace": "geo"}, headers=bearer(ADMIN))
    again = client.post("/jobs/train", json={"namespace": "geo"}, headers=bearer(ADMIN))
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and first.json()["status"] == "queued"
    job = client.get(f"/jobs/{first.json()['id']}", headers=bearer(ADAPTER_READER)).json()
    assert job["kind"] == "train" and job["namespace"] == "geo"
    assert client.get("/jobs/4242", headers=bearer(ADAPTER_READER)).status_code == 404
    assert client.post("/jobs/train", json={"namespace": "x/y"}, headers=bearer(ADMIN)).status_code == 422


# --- auth, health, metrics (one backend is enough: no database behaviour) ---------------------------


@pytest.fixture
def sqlite_client(tmp_path: Path, qwen2_tokenizer: Path) -> Iterator[TestClient]:
    settings = make_settings(f"sqlite:///{tmp_path / 'auth.db'}", tmp_path, qwen2_tokenizer)
    with TestClient(create_app(settings, start_background=False)) as test_client:
        yield test_client


def route_scopes(client: TestClient) -> list[tuple[str, str, str | None]]:
    """(method, path, scope) of every operation, read from the app's own OpenAPI document."""
    found = []
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            requirements = operation.get("security")
            if requirements is None:
                found.append((method.upper(), path, None))
                continue
            (requirement,) = requirements
            (scopes,) = requirement.values()
            assert len(scopes) == 1, (method, path, scopes)
            found.append((method.upper(), path, scopes[0]))
    return found


def example_path(path: str) -> str:
    return (
        path.replace("{name}", "geo")
        .replace("{version}", "0")
        .replace("{feedback_id}", "1")
        .replace("{conversation_id}", "1")
        .replace("{memory_id}", "1")
        .replace("{job_id}", "1")
    )


def test_every_route_declares_a_scope_and_enforces_it(sqlite_client: TestClient) -> None:
    scoped = route_scopes(sqlite_client)
    assert len(scoped) >= 20
    public_paths = {path for _, path, scope in scoped if scope is None}
    assert public_paths == {"/healthz", "/readyz", "/metrics"}
    token_of = {"feedback:write": WRITER, "feedback:read": READER, "adapters:read": ADAPTER_READER}
    for method, template, scope in scoped:
        if scope is None:
            continue
        path = example_path(template)
        anonymous = sqlite_client.request(method, path)
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        assert sqlite_client.request(method, path, headers=bearer("wrong")).status_code == 401
        other = READER if scope != "feedback:read" else WRITER
        assert sqlite_client.request(method, path, headers=bearer(other)).status_code == 403, (method, path)
        if scope in token_of:
            allowed = sqlite_client.request(method, path, headers=bearer(token_of[scope]))
            assert allowed.status_code not in (401, 403), (method, path)


def test_auth_disabled_only_when_configured(tmp_path: Path, qwen2_tokenizer: Path) -> None:
    with pytest.raises(ValueError, match="LORALOOP_AUTH_TOKENS"):
        make_settings("sqlite://", tmp_path, qwen2_tokenizer, auth_tokens="")
    settings = make_settings(
        f"sqlite:///{tmp_path / 'open.db'}", tmp_path, qwen2_tokenizer, auth_tokens="", auth_disabled=True
    )
    with TestClient(create_app(settings, start_background=False)) as client:
        assert client.post("/feedback", json=item()).status_code == 202
        assert client.post("/adapters/geo/rollback", json={}).status_code == 404


def test_cors_is_off_by_default(sqlite_client: TestClient) -> None:
    preflight = sqlite_client.options(
        "/feedback", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_health_readiness_and_metrics(sqlite_client: TestClient) -> None:
    assert sqlite_client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert sqlite_client.get("/readyz").status_code == 200
    sqlite_client.post("/feedback", json=item(), headers=bearer(WRITER))
    sqlite_client.post("/feedback", json=item(target_index=9), headers=bearer(WRITER))
    text = sqlite_client.get("/metrics").text
    assert 'loraloop_http_requests_total{method="POST",route="/feedback",status="202"} 1.0' in text
    assert 'loraloop_http_requests_total{method="POST",route="/feedback",status="422"} 1.0' in text
    assert 'loraloop_feedback_accepted_total{namespace="geo"} 1.0' in text
    assert 'loraloop_job_queue_depth{status="queued"} 1.0' in text
    assert "loraloop_job_duration_seconds" in text
    assert 'loraloop_http_request_duration_seconds_count{method="POST",route="/feedback"} 2.0' in text


def test_unreachable_database_answers_503_quickly(tmp_path: Path, qwen2_tokenizer: Path) -> None:
    import time

    settings = make_settings(
        "postgresql+psycopg://postgres@127.0.0.1:9/none", tmp_path, qwen2_tokenizer, db_connect_timeout_s=1
    )
    client = TestClient(create_app(settings, start_background=False))  # no lifespan: no upgrade
    started = time.monotonic()
    assert client.get("/readyz").status_code == 503
    response = client.post("/feedback", json=item(), headers=bearer(WRITER))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "database_unavailable"
    assert "127.0.0.1" not in response.text
    assert time.monotonic() - started < 10


def test_info_logs_hold_no_token_or_feedback_content(
    sqlite_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret_text = "the-secret-continuation-text"
    with caplog.at_level(logging.INFO):
        sqlite_client.post("/feedback", json=item(continuation=secret_text), headers=bearer(WRITER))
        sqlite_client.post(
            "/feedback", json=item(target_index=9, continuation=secret_text), headers=bearer("bad")
        )
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert secret_text not in logged and WRITER not in logged


def test_train_now_advances_a_debounced_job(tmp_path: Path, qwen2_tokenizer: Path) -> None:
    from datetime import datetime, timedelta

    settings = make_settings(
        f"sqlite:///{tmp_path / 'now.db'}", tmp_path, qwen2_tokenizer, train_debounce_s=3600
    )
    with TestClient(create_app(settings, start_background=False)) as client:
        assert client.post("/feedback", json=item(), headers=bearer(WRITER)).status_code == 202
        (debounced,) = client.get("/jobs", headers=bearer(ADAPTER_READER)).json()["items"]
        now = client.post("/jobs/train", json={"namespace": "geo"}, headers=bearer(ADMIN)).json()
        assert now["id"] == debounced["id"]
        run_after = datetime.fromisoformat(now["run_after"])
        stored = client.get(f"/jobs/{now['id']}", headers=bearer(ADAPTER_READER)).json()["run_after"]
        assert datetime.fromisoformat(stored) == run_after
        queued_at = datetime.fromisoformat(debounced["run_after"])
        assert run_after.replace(tzinfo=None) < queued_at.replace(tzinfo=None) - timedelta(minutes=50)


def _queued_train_job(client: TestClient, namespace: str) -> dict[str, Any]:
    jobs = client.get("/jobs", params={"status": "queued"}, headers=bearer(ADAPTER_READER)).json()["items"]
    (job,) = [job for job in jobs if job["kind"] == "train" and job["namespace"] == namespace]
    return job


def test_each_item_pushes_the_debounced_run_back_until_the_count_trigger_fires(
    db_url: str, tmp_path: Path, qwen2_tokenizer: Path
) -> None:
    settings = make_settings(db_url, tmp_path, qwen2_tokenizer, train_debounce_s=600, train_trigger_count=3)
    with TestClient(create_app(settings, start_background=False)) as client:
        client.post("/feedback", json=item(continuation="Paris."), headers=bearer(WRITER))
        first = _queued_train_job(client, "geo")
        client.post("/feedback", json=item(continuation="Paris!"), headers=bearer(WRITER))
        second = _queued_train_job(client, "geo")
        assert second["id"] == first["id"]  # one run per namespace, deduplicated
        assert second["run_after"] > first["run_after"]  # debounced: T seconds after the LAST item
        client.post("/feedback", json=item(continuation="It is Paris."), headers=bearer(WRITER))
        third = _queued_train_job(client, "geo")
        assert third["id"] == first["id"]
        assert third["run_after"] < first["run_after"]  # 3 pending items: run now, not in 10 minutes
