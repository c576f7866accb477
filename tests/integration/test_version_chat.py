"""Asking one version by its own name (`<namespace>-v<N>`) through the OpenAI gateway and the
dashboard's chat box: the version is loaded on vLLM for a while without becoming current, the
alias keeps answering with the current version, namespace binding applies to the namespace, and a
version that does not exist (or whose files retention deleted) is an unknown model that creates
nothing. On SQLite and PostgreSQL, vLLM is tests.unit.fake_vllm.FakeVllm; data as the dashboard
tests build it (tests.integration.test_dashboard.seed: geo v0 -> v1 -> v2 current).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from memory_store.models import Adapter, Conversation
from memory_store.repositories import AdapterRepository
from service.app import create_app
from tests.integration.test_dashboard import csrf_of, login, make_settings, seed
from tests.unit.fake_vllm import FakeVllm

pytestmark = pytest.mark.integration

ASKER, OTHER_ONLY = "asker-secret-token", "other-secret-token"
TOKENS = f"{ASKER}=adapters:read inference label:asker,{OTHER_ONLY}=inference ns:other label:other-team"


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    with FakeVllm() as server:
        yield server


@pytest.fixture
def client(db_url: str, tmp_path: Path, fake_vllm: FakeVllm) -> Iterator[TestClient]:
    settings = make_settings(db_url, tmp_path, fake_vllm).model_copy(update={"auth_tokens": TOKENS})
    with TestClient(create_app(settings, start_background=False), follow_redirects=False) as test_client:
        seed(settings, test_client.app.state.session_factory, fake_vllm)  # type: ignore[attr-defined]
        for name in ("geo-v0", "geo-v1"):  # drained long ago: only the current version is loaded
            fake_vllm.state.adapters.pop(name)
        yield test_client


def ask(client: TestClient, model: str, token: str = ASKER):
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Capital of France?"}]},
        headers={"Authorization": f"Bearer {token}"},
    )


def test_an_old_version_is_asked_by_its_name_and_the_alias_stays_current(
    client: TestClient, fake_vllm: FakeVllm
) -> None:
    response = ask(client, "geo-v1")
    assert response.status_code == 200, response.text
    assert response.headers["X-Loraloop-Served-Model"] == "geo-v1"
    assert response.json()["choices"][0]["message"]["content"] == "answer from geo-v1"
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        folder = AdapterRepository(session).get_version(name="geo", version=1).path
    assert fake_vllm.state.adapters["geo-v1"] == folder  # loaded for the question, from its own folder
    loads = fake_vllm.calls("/v1/load_lora_adapter")
    assert ask(client, "geo-v1").status_code == 200
    assert fake_vllm.calls("/v1/load_lora_adapter") == loads  # held for a while, not loaded per request

    current = ask(client, "geo")
    assert current.headers["X-Loraloop-Served-Model"] == "geo-v2"  # the alias did not move
    with factory() as session:
        assert AdapterRepository(session).get_adapter(name="geo").current_version == 2
        conversation = session.get(Conversation, int(response.headers["X-Loraloop-Conversation-Id"]))
        assert conversation is not None
        assert (conversation.namespace, conversation.model) == ("geo", "geo-v1")

    fake_vllm.state.adapters.pop("geo-v1")  # unloaded behind our back (another process's reconciler)
    again = ask(client, "geo-v1")
    assert again.status_code == 200 and again.headers["X-Loraloop-Served-Model"] == "geo-v1"


def test_unknown_versions_and_tombstones_are_unknown_models_and_create_nothing(
    client: TestClient, fake_vllm: FakeVllm
) -> None:
    missing = ask(client, "geo-v9")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "model_not_found"
    assert "has no version 9" in missing.json()["error"]["message"]
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory.begin() as session:
        assert session.get(Adapter, "geo-v9") is None  # not taken for a new namespace's first request
        AdapterRepository(session).mark_files_deleted(name="geo", version=0)
    tombstone = ask(client, "geo-v0")
    assert tombstone.status_code == 404, tombstone.text
    assert "tombstone" in tombstone.json()["error"]["message"]
    assert "geo-v0" not in fake_vllm.state.adapters


def test_namespace_binding_applies_to_a_versions_namespace(client: TestClient) -> None:
    refused = ask(client, "geo-v1", OTHER_ONLY)
    unknown = ask(client, "nowhere-v1", OTHER_ONLY)
    assert refused.status_code == unknown.status_code == 404  # the same answer as a namespace that does not exist
    assert refused.json()["error"]["message"] == "the model 'geo-v1' does not exist"
    assert ask(client, "other-v0", OTHER_ONLY).status_code == 200


def test_the_dashboard_chat_asks_a_version_linked_from_its_page(client: TestClient) -> None:
    login(client, ASKER)
    version_page = client.get("/ui/ns/geo/v/1")
    assert version_page.status_code == 200
    assert 'href="/ui/chat?model=geo-v1"' in version_page.text
    chat = client.get("/ui/chat", params={"model": "geo-v1"})
    assert '<option value="geo-v1" selected>' in chat.text
    answered = client.post("/ui/chat", data={"model": "geo-v1", "question": "Capital?", "csrf": csrf_of(chat.text)})
    assert answered.status_code == 200, answered.text
    assert '<span id="served">geo-v1</span>' in answered.text and "answer from geo-v1" in answered.text
    login(client, OTHER_ONLY)
    chat = client.get("/ui/chat")
    refused = client.post("/ui/chat", data={"model": "geo-v1", "question": "Capital?", "csrf": csrf_of(chat.text)})
    assert refused.status_code == 404
