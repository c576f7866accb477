"""Issue 12, items 6-9, through the ASGI app on SQLite and PostgreSQL: out-of-range datetimes are
422, authentication comes before body parsing, derived batch keys never collide with client keys,
integers are strict, and conversations are structurally checked (422 naming the field)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.integration.test_api import (
    ADMIN,
    ASSISTANT,
    READER,
    USER,
    WRITER,
    bearer,
    item,
    make_settings,
    qwen2_tokenizer,  # noqa: F401 - fixture
    stored_count,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def client(db_url: str, tmp_path, qwen2_tokenizer) -> Iterator[TestClient]:  # noqa: F811
    settings: Settings = make_settings(db_url, tmp_path, qwen2_tokenizer)
    with TestClient(create_app(settings, start_background=False)) as test_client:
        yield test_client


def refusal(response: Any, field: str, status: int = 422) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    return str(error["message"])


# --- item 6: datetimes out of range --------------------------------------------------------------


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"])
def test_since_outside_the_utc_range_is_422(client: TestClient, since: str) -> None:
    message = refusal(client.get("/feedback", params={"since": since}, headers=bearer(READER)), "since")
    assert "out of range" in message


@pytest.mark.parametrize(
    "since", ["0001-01-01T00:00:00Z", "0001-01-02T00:00:00+23:59", "9999-12-31T23:59:59Z"]
)
def test_since_at_the_edges_of_the_range_is_answered(client: TestClient, since: str) -> None:
    client.post("/feedback", json=item(), headers=bearer(WRITER))
    response = client.get("/feedback", params={"since": since}, headers=bearer(READER))
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == (0 if since.startswith("9999") else 1)


def test_since_with_an_offset_compares_the_instant(client: TestClient) -> None:
    client.post("/feedback", json=item(), headers=bearer(WRITER))
    created = client.get("/feedback", headers=bearer(READER)).json()["items"][0]["created_at"]
    from datetime import datetime, timedelta, timezone

    instant = datetime.fromisoformat(created)
    later_in_tokyo = (instant + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=9)))
    earlier_in_lima = (instant - timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-5)))
    assert stored_count(client, since=later_in_tokyo.isoformat()) == 0
    assert stored_count(client, since=earlier_in_lima.isoformat()) == 1


# --- item 7: authentication before body parsing --------------------------------------------------

BODY_ROUTES = [
    "/feedback",
    "/feedback:batch",
    "/conversations",
    "/memories",
    "/adapters/geo/rollback",
    "/jobs/train",
    "/v1/chat/completions",
]


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", [b'{"messages": [', b"not json", b'{"a": 1,}'])
def test_malformed_body_without_a_token_is_401(client: TestClient, path: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    for auth in ({}, bearer("wrong-token"), {"Authorization": "Basic abc"}):
        response = client.post(path, content=body, headers={**headers, **auth})
        assert response.status_code == 401, (path, auth, response.text)
        assert response.json()["error"]["type"] == "unauthenticated"
        assert "JSON" not in response.text and "character" not in response.text


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_malformed_body_with_a_token_lacking_the_scope_is_403(client: TestClient, path: str) -> None:
    response = client.post(
        path, content=b'{"messages": [', headers={"Content-Type": "application/json", **bearer(READER)}
    )
    # the reader token holds feedback:read only: every one of these routes needs another scope
    assert response.status_code == 403, response.text
    assert response.json()["error"]["type"] == "forbidden"
    assert "character" not in response.text


def test_malformed_body_with_the_scope_still_names_the_parse_error(client: TestClient) -> None:
    response = client.post(
        "/feedback", content=b'{"messages": [', headers={"Content-Type": "application/json", **bearer(WRITER)}
    )
    assert refusal(response, "body").startswith("body: JSON decode error")


# --- item 8: derived batch keys ------------------------------------------------------------------


def test_a_client_key_shaped_like_an_old_derived_key_does_not_block_a_batch(client: TestClient) -> None:
    single = client.post("/feedback", json=item(), headers={**bearer(WRITER), "Idempotency-Key": "order-7#0"})
    assert single.status_code == 202, single.text
    batch = {"items": [item(continuation="Paris, first."), item(continuation="Paris, second.")]}
    first = client.post(
        "/feedback:batch", json=batch, headers={**bearer(WRITER), "Idempotency-Key": "order-7"}
    )
    assert first.status_code == 202, first.text
    ids = [entry["id"] for entry in first.json()["items"]]
    assert single.json()["id"] not in ids and len(set(ids)) == 2
    replay = client.post(
        "/feedback:batch", json=batch, headers={**bearer(WRITER), "Idempotency-Key": "order-7"}
    )
    assert [entry["id"] for entry in replay.json()["items"]] == ids
    # and the other way round: a single POST after the batch, with the batch item's old-style key
    later = client.post(
        "/feedback",
        json=item(continuation="Paris, third."),
        headers={**bearer(WRITER), "Idempotency-Key": "order-7#1"},
    )
    assert later.status_code == 202, later.text
    assert later.json()["id"] not in ids
    assert stored_count(client) == 4


def test_item_keys_may_not_hold_control_characters(client: TestClient) -> None:
    body = {"items": [item(), {**item(continuation="Paris!"), "idempotency_key": "order-8\x1f0"}]}
    message = refusal(
        client.post("/feedback:batch", json=body, headers=bearer(WRITER)), "items[1].idempotency_key"
    )
    assert "control characters" in message
    assert stored_count(client) == 0


def test_an_item_key_cannot_claim_another_batch_items_derived_key(client: TestClient) -> None:
    first = client.post(
        "/feedback:batch", json={"items": [item()]}, headers={**bearer(WRITER), "Idempotency-Key": "b-1"}
    )
    assert first.status_code == 202
    for key in ("b-1#0", "b-1 0", "b-1_0"):
        other = client.post(
            "/feedback:batch",
            json={"items": [{**item(continuation=f"Paris {key}."), "idempotency_key": key}]},
            headers=bearer(WRITER),
        )
        assert other.status_code == 202, other.text
        assert other.json()["items"][0]["id"] != first.json()["items"][0]["id"]


# --- item 9: strict integers, conversation structure ---------------------------------------------


@pytest.mark.parametrize("value", [True, False, "1", 1.0])
def test_target_index_must_be_a_json_integer(client: TestClient, value: Any) -> None:
    refusal(client.post("/feedback", json=item(target_index=value), headers=bearer(WRITER)), "target_index")
    assert stored_count(client) == 0


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/feedback", item(conversation_id=True, messages=None), "conversation_id"),
        ("/memories", {"content": "Paris is the capital.", "priority": True}, "priority"),
        ("/adapters/geo/rollback", {"version": True}, "version"),
    ],
)
def test_other_integer_fields_refuse_booleans(client: TestClient, path: str, body: dict, field: str) -> None:
    refusal(client.post(path, json=body, headers=bearer(ADMIN)), field)


def test_a_system_only_context_is_refused(client: TestClient) -> None:
    system = {"role": "system", "content": "You are terse."}
    message = refusal(
        client.post("/feedback", json=item(messages=[system]), headers=bearer(WRITER)), "messages"
    )
    assert "only system messages" in message
    two_systems = item(messages=[system, system, USER, ASSISTANT], target_index=2)
    refusal(client.post("/feedback", json=two_systems, headers=bearer(WRITER)), "messages")
    batch = {"items": [item(), item(messages=[system])]}
    refusal(client.post("/feedback:batch", json=batch, headers=bearer(WRITER)), "items[1].messages")
    conversation = client.post("/conversations", json={"messages": [system]}, headers=bearer(WRITER))
    refusal(conversation, "messages")
    assert stored_count(client) == 0
    accepted = client.post("/feedback", json=item(messages=[system, USER]), headers=bearer(WRITER))
    assert accepted.status_code == 202, accepted.text


def test_a_context_from_a_logged_conversation_names_conversation_id(client: TestClient) -> None:
    system = {"role": "system", "content": "You are terse."}
    logged = client.post(
        "/conversations", json={"messages": [system, USER, ASSISTANT]}, headers=bearer(WRITER)
    )
    assert logged.status_code == 201, logged.text
    body = {"conversation_id": logged.json()["id"], "target_index": 1, "continuation": "Paris."}
    refusal(client.post("/feedback", json=body, headers=bearer(WRITER)), "conversation_id")


CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        ([USER, {"role": "tool", "content": "18C"}], "messages[1].tool_call_id", "required"),
        (
            [USER, {"role": "tool", "tool_call_id": "c1", "content": "18C"}],
            "messages[1].tool_call_id",
            "matches no",
        ),
        (
            [
                USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c2", "content": "18C"},
            ],
            "messages[2].tool_call_id",
            "matches no",
        ),
        (
            [
                USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "18C"},
            ],
            "messages[2].tool_call_id",
            "required",
        ),
        (  # the call comes after the answer
            [
                USER,
                {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
            ],
            "messages[1].tool_call_id",
            "matches no",
        ),
    ],
)
def test_a_tool_message_must_answer_an_earlier_tool_call(
    client: TestClient, messages: list, field: str, reason: str
) -> None:
    message = refusal(client.post("/feedback", json=item(messages=messages), headers=bearer(WRITER)), field)
    assert reason in message
    logged = client.post("/conversations", json={"messages": messages}, headers=bearer(WRITER))
    assert reason in refusal(logged, field)
    assert stored_count(client) == 0


def test_tool_messages_answering_calls_are_accepted(client: TestClient) -> None:
    anonymous = {"type": "function", "function": {"name": "weather", "arguments": "{}"}}
    for call, answer in ((CALL, {"tool_call_id": "c1"}), (anonymous, {})):
        messages = [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "18C", **answer},
        ]
        response = client.post("/feedback", json=item(messages=messages), headers=bearer(WRITER))
        assert response.status_code == 202, response.text
