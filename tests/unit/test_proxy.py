"""The OpenAI-compatible proxy without vLLM: alias -> current served name, forwarding and
round-robin, OpenAI-style error mapping, conversation logging (and feedback pointing at it),
streaming passthrough with the answer assembled, scopes. vLLM is an httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from memory_store.repositories import AdapterRepository, ConversationRepository
from service.app import create_app
from service.config import Settings
from service.inference.proxy import (
    CONVERSATION_HEADER,
    SERVED_MODEL_HEADER,
    AliasResolver,
    InferenceProxy,
    ReplicaPool,
    StreamAssembler,
    upstream_error,
)

REPLICAS = ["http://vllm-a:8000", "http://vllm-b:8000"]
Handler = Callable[[httpx.Request], httpx.Response]


def chat_answer(model: str, text: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def sse(events: list[dict[str, object]]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


class FakeReplicas:
    """Records what reached each replica; `handler` decides the answer."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []
        self.handler: Handler = self.echo

    def echo(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json=chat_answer(body["model"], f"answer from {body['model']}"))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(
            (f"{request.url.scheme}://{request.url.host}:{request.url.port}", json.loads(request.content))
        )
        return self.handler(request)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'proxy.db'}",
        data_dir=tmp_path,
        auth_tokens="infer-token=inference,feedback-token=feedback:write",
        base_model=tmp_path / "no-model",
        vllm_urls=REPLICAS,
        alias_cache_ttl_s=0.0,
    )


@pytest.fixture
def replicas() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
def client(settings: Settings, replicas: FakeReplicas) -> Iterator[TestClient]:
    app = create_app(settings, start_background=False)
    with TestClient(app, headers={"Authorization": "Bearer infer-token"}) as test_client:
        original = app.state.inference_proxy
        app.state.inference_proxy = InferenceProxy(
            AliasResolver(app.state.session_factory, ttl_s=0.0),
            ReplicaPool(REPLICAS, cooldown_s=60.0),
            timeout_s=5.0,
            connect_timeout_s=1.0,
            transport=httpx.MockTransport(replicas),
        )
        test_client.portal.call(original.aclose)
        yield test_client


def add_version(client: TestClient, name: str, version: int, *, current: bool = True) -> None:
    with client.app.state.session_factory.begin() as session:  # type: ignore[attr-defined]
        repository = AdapterRepository(session)
        repository.ensure_adapter(name=name, base_model="tiny")
        repository.add_version(
            name=name, version=version, path=f"/adapters/{name}/v{version}", sha256="0" * 64
        )
        if current:
            repository.set_current(name=name, version=version)


def chat(client: TestClient, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post("/v1/chat/completions", json=body)


def test_alias_resolves_to_current_version_and_follows_a_swap(
    client: TestClient, replicas: FakeReplicas
) -> None:
    add_version(client, "support", 0)
    first = chat(client, "support")
    assert first.status_code == 200, first.text
    assert first.headers[SERVED_MODEL_HEADER] == "support-v0"
    assert replicas.seen[-1][1]["model"] == "support-v0"
    assert first.json()["choices"][0]["message"]["content"] == "answer from support-v0"

    add_version(client, "support", 1)  # what the registry does after loading v1 everywhere
    second = chat(client, "support")
    assert second.headers[SERVED_MODEL_HEADER] == "support-v1"
    assert replicas.seen[-1][1]["model"] == "support-v1"


def test_requests_round_robin_over_replicas(client: TestClient, replicas: FakeReplicas) -> None:
    add_version(client, "ns", 0)
    for _ in range(4):
        assert chat(client, "ns").status_code == 200
    assert [url for url, _ in replicas.seen] == [REPLICAS[0], REPLICAS[1], REPLICAS[0], REPLICAS[1]]


def test_the_conversation_is_logged_and_feedback_can_point_at_it(client: TestClient) -> None:
    add_version(client, "ns", 0)
    response = chat(client, "ns", temperature=0)
    conversation_id = int(response.headers[CONVERSATION_HEADER])
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        stored = ConversationRepository(session).get(id=conversation_id)
        assert stored.namespace == "ns"
        assert stored.model == "ns-v0"
        assert stored.messages == [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "answer from ns-v0"},
        ]
    feedback = client.post(
        "/feedback",
        json={
            "namespace": "ns",
            "conversation_id": conversation_id,
            "target_index": 1,
            "continuation": "Better.",
        },
        headers={"Authorization": "Bearer feedback-token"},
    )
    assert feedback.status_code == 202, feedback.text


def test_a_model_that_is_no_namespace_is_a_404_in_openai_shape_and_never_reaches_vllm(
    client: TestClient, replicas: FakeReplicas, settings: Settings
) -> None:
    for model in (str(settings.base_model), "../etc", "-dash"):
        response = chat(client, model)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["type"] == "model_not_found"
        assert error["param"] == "model"
        assert error["code"] == 404
    assert replicas.seen == []


def test_adapter_without_current_version_is_503_not_the_base_model(
    client: TestClient, replicas: FakeReplicas
) -> None:
    add_version(client, "fresh", 0, current=False)
    response = chat(client, "fresh")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "model_not_ready"
    assert response.headers["Retry-After"]
    assert replicas.seen == []


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_type", "expected_message"),
    [
        (
            400,
            {
                "error": {
                    "message": "max_tokens is too large",
                    "type": "BadRequestError",
                    "param": "max_tokens",
                    "code": 400,
                }
            },
            400,
            "BadRequestError",
            "max_tokens is too large",
        ),
        (500, "<html>boom</html>", 500, "upstream_error", "vLLM answered 500"),
        (503, "<html>busy</html>", 503, "inference_unavailable", "vLLM answered 503"),
    ],
)
def test_upstream_errors_are_mapped(
    client: TestClient,
    replicas: FakeReplicas,
    status: int,
    body: object,
    expected_status: int,
    expected_type: str,
    expected_message: str,
) -> None:
    add_version(client, "ns", 0)
    payload = json.dumps(body).encode() if isinstance(body, dict) else str(body).encode()
    replicas.handler = lambda request: httpx.Response(status, content=payload)
    response = chat(client, "ns")
    assert response.status_code == expected_status
    error = response.json()["error"]
    assert error["type"] == expected_type
    assert error["message"].startswith(expected_message)
    assert error["code"] == expected_status


def test_vllm_down_answers_503_fast_and_a_dead_replica_is_skipped(
    client: TestClient, replicas: FakeReplicas
) -> None:
    add_version(client, "ns", 0)

    def refuse_a(request: httpx.Request) -> httpx.Response:
        if request.url.host == "vllm-a":
            raise httpx.ConnectError("connection refused", request=request)
        return replicas.echo(request)

    replicas.handler = refuse_a
    for _ in range(3):
        assert chat(client, "ns").status_code == 200
    # a cooling replica is tried only after the healthy one
    assert [url for url, _ in replicas.seen].count(REPLICAS[0]) == 1

    def refuse_all(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    replicas.handler = refuse_all
    response = chat(client, "ns")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "inference_unavailable"


def test_a_replica_without_the_adapter_is_skipped_then_503(
    client: TestClient, replicas: FakeReplicas
) -> None:
    add_version(client, "ns", 2)
    missing = {
        "error": {"message": "The model `ns-v2` does not exist.", "type": "NotFoundError", "code": 404}
    }

    def only_b_loaded(request: httpx.Request) -> httpx.Response:
        if request.url.host == "vllm-a":
            return httpx.Response(404, json=missing)
        return replicas.echo(request)

    replicas.handler = only_b_loaded
    for _ in range(2):
        response = chat(client, "ns")
        assert response.status_code == 200
        assert response.headers[SERVED_MODEL_HEADER] == "ns-v2"

    replicas.handler = lambda request: httpx.Response(404, json=missing)
    response = chat(client, "ns")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "model_not_ready"


def test_streaming_is_passed_through_and_the_answer_assembled(
    client: TestClient, replicas: FakeReplicas
) -> None:
    add_version(client, "ns", 0)
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo!"}, "finish_reason": "stop"}]},
    ]
    raw = sse(events)
    replicas.handler = lambda request: httpx.Response(
        200, content=raw, headers={"content-type": "text/event-stream"}
    )
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "ns", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        conversation_id = int(response.headers[CONVERSATION_HEADER])
        received = b"".join(response.iter_bytes())
    assert received == raw
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        messages = ConversationRepository(session).get(id=conversation_id).messages
    assert messages[-1] == {"role": "assistant", "content": "Hello!"}


def test_completions_are_forwarded_but_not_logged(client: TestClient, replicas: FakeReplicas) -> None:
    add_version(client, "ns", 1)
    replicas.handler = lambda request: httpx.Response(
        200, json={"choices": [{"index": 0, "text": " world", "finish_reason": "length"}]}
    )
    response = client.post("/v1/completions", json={"model": "ns", "prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200
    assert replicas.seen[-1][1] == {"model": "ns-v1", "prompt": "hello", "max_tokens": 2}
    assert CONVERSATION_HEADER not in response.headers


def test_models_lists_the_aliases_with_a_current_version(client: TestClient) -> None:
    add_version(client, "alpha", 0)
    add_version(client, "beta", 0, current=False)
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["root"]) for m in data] == [("alpha", "alpha-v0")]


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("feedback-token", 403), ("infer-token", 200)])
def test_inference_needs_the_inference_scope(client: TestClient, token: str | None, status: int) -> None:
    add_version(client, "ns", 0)
    headers = {"Authorization": f"Bearer {token}"} if token else {"Authorization": ""}
    response = client.post(
        "/v1/chat/completions",
        json={"model": "ns", "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    )
    assert response.status_code == status


def test_bad_bodies_are_400_in_openai_shape(client: TestClient) -> None:
    bad = [
        client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        ),
        client.post("/v1/chat/completions", json={"model": "ns", "messages": []}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
        client.post("/v1/completions", json={"model": "ns"}),
    ]
    for response in bad:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_stream_assembler_handles_chunks_split_anywhere() -> None:
    raw = sse(
        [
            {"choices": [{"index": 0, "delta": {"content": "con"}}]},
            {"choices": [{"index": 1, "delta": {"content": "IGNORED"}}]},
            {"choices": [{"index": 0, "delta": {"content": "tinuation"}}]},
        ]
    )
    for size in (1, 3, 7, len(raw)):
        assembler = StreamAssembler("chat")
        for start in range(0, len(raw), size):
            assembler.feed(raw[start : start + size])
        assert assembler.done
        assert assembler.message() == {"role": "assistant", "content": "continuation"}


def test_upstream_error_of_fastapi_detail() -> None:
    error = upstream_error(404, b'{"detail": "Not Found"}')
    assert error.status_code == 404
    assert "Not Found" in error.message
