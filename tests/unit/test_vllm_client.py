"""VllmClient against a real (fake-vLLM) HTTP server: plain-text success bodies, JSON error mapping,
retries with backoff, timeouts, tokenization and sleep mode; MockTransport only for odd bodies."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from deploy.vllm_client import (
    AdapterAlreadyLoaded,
    AdapterNotFound,
    ServedModel,
    VllmClient,
    VllmError,
    VllmUnavailable,
    error_from_response,
)
from tests.unit.fake_vllm import FakeVllm, Fault


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "adapters" / "ns" / "v1"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


@pytest.fixture
def server():
    with FakeVllm() as fake:
        yield fake


@pytest.fixture
def client(server: FakeVllm):
    with VllmClient(server.url, timeout=2.0, retries=3, backoff_s=0.01) as c:
        yield c


def test_load_list_and_unload_an_adapter(client: VllmClient, server: FakeVllm, adapter_dir: Path) -> None:
    client.load_adapter("ns-v1", adapter_dir)
    assert server.state.requests[-1][2] == {"lora_name": "ns-v1", "lora_path": str(adapter_dir)}
    models = client.models()
    assert ServedModel("tiny", "/models/tiny", None) in models
    assert client.adapters() == {"ns-v1": str(adapter_dir)}
    client.unload_adapter("ns-v1")
    assert client.adapters() == {}


def test_inplace_load_sends_the_flag(client: VllmClient, server: FakeVllm, adapter_dir: Path) -> None:
    client.load_adapter("ns-v1", adapter_dir)
    client.load_adapter("ns-v1", adapter_dir, inplace=True)
    assert server.state.requests[-1][2]["load_inplace"] is True


def test_double_load_raises_already_loaded(client: VllmClient, adapter_dir: Path) -> None:
    client.load_adapter("ns-v1", adapter_dir)
    with pytest.raises(AdapterAlreadyLoaded) as info:
        client.load_adapter("ns-v1", adapter_dir)
    assert info.value.status == 400
    assert info.value.error_type == "InvalidUserInput"


def test_bad_path_and_unknown_name_raise_not_found(client: VllmClient, tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFound):
        client.load_adapter("ns-v9", tmp_path / "missing")
    with pytest.raises(AdapterNotFound):
        client.unload_adapter("never-loaded")


def test_transient_503_is_retried_with_backoff(
    client: VllmClient, server: FakeVllm, adapter_dir: Path
) -> None:
    server.state.faults.extend([Fault("/v1/load_lora_adapter"), Fault("/v1/load_lora_adapter", status=502)])
    client.load_adapter("ns-v1", adapter_dir)
    assert server.calls("/v1/load_lora_adapter") == 3
    assert client.adapters() == {"ns-v1": str(adapter_dir)}


def test_persistent_5xx_gives_up_as_unavailable(server: FakeVllm) -> None:
    server.state.faults.extend(Fault("/v1/models") for _ in range(10))
    with (
        VllmClient(server.url, retries=2, backoff_s=0.01) as client,
        pytest.raises(VllmUnavailable, match="after 3 attempts"),
    ):
        client.models()
    assert server.calls("/v1/models") == 3


def test_deliberate_500_error_is_not_retried(client: VllmClient, server: FakeVllm, adapter_dir: Path) -> None:
    body = json.dumps({"error": {"message": "rank 64 > max 16", "type": "InternalServerError", "code": 500}})
    server.state.faults.append(Fault("/v1/load_lora_adapter", status=500, body=body.encode()))
    with pytest.raises(VllmError, match="rank 64") as info:
        client.load_adapter("ns-v1", adapter_dir)
    assert type(info.value) is VllmError
    assert server.calls("/v1/load_lora_adapter") == 1


def test_dropped_connection_then_already_loaded_counts_as_success(
    client: VllmClient, server: FakeVllm, adapter_dir: Path
) -> None:
    # the first attempt reached vLLM (it loaded) but the answer was lost: the retry sees 400
    server.state.adapters["ns-v1"] = str(adapter_dir)
    server.state.faults.append(Fault("/v1/load_lora_adapter", drop=True))
    client.load_adapter("ns-v1", adapter_dir)
    assert server.calls("/v1/load_lora_adapter") == 2


def test_read_timeout_raises_unavailable_without_retry(server: FakeVllm) -> None:
    server.state.faults.append(Fault("/v1/models", status=200, delay_s=1.0))
    with VllmClient(server.url, timeout=0.2, retries=3, backoff_s=0.01) as client:
        started = time.monotonic()
        with pytest.raises(VllmUnavailable, match="timed out"):
            client.models()
        assert time.monotonic() - started < 0.9


def test_connection_refused_retries_then_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens
    with VllmClient(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01) as client:
        assert client.health() is False
        with pytest.raises(VllmUnavailable, match="ConnectError"):
            client.models()


def test_health(client: VllmClient, server: FakeVllm) -> None:
    assert client.health() is True
    server.state.faults.append(Fault("/health", status=503))
    assert client.health() is False


def test_tokenize_messages_and_prompt(client: VllmClient, server: FakeVllm) -> None:
    messages = [{"role": "user", "content": "hi"}]
    ids = client.tokenize(messages=messages, model="ns-v1")
    assert ids == [ord(c) for c in "<user>hi<assistant>"]
    sent = server.state.requests[-1][2]
    assert sent == {
        "model": "ns-v1",
        "messages": messages,
        "add_generation_prompt": True,
        "add_special_tokens": False,
    }
    assert client.tokenize(prompt="ab") == [1, 97, 98]
    assert client.tokenize(prompt="ab", add_special_tokens=False) == [97, 98]
    with pytest.raises(ValueError, match="exactly one"):
        client.tokenize()


def test_sleep_wake_up(client: VllmClient, server: FakeVllm) -> None:
    assert client.is_sleeping() is False
    client.sleep(level=1)
    assert client.is_sleeping() is True
    client.wake_up(tags=["weights"])
    assert client.is_sleeping() is False
    assert server.state.requests[-2][1] == "/wake_up"


def test_route_not_enabled_is_a_plain_error(client: VllmClient, server: FakeVllm) -> None:
    server.state.faults.append(Fault("/sleep", status=404, body=b'{"detail": "Not Found"}'))
    with pytest.raises(VllmError) as info:
        client.sleep()
    assert type(info.value) is VllmError and info.value.status == 404


def test_error_mapping_of_odd_bodies() -> None:
    assert type(error_from_response(400, b"not json")) is VllmError
    assert type(error_from_response(503, b"<html>")) is VllmUnavailable
    err = error_from_response(400, b'{"error": {"message": "The lora adapter \'x\' conflicts", "type": "X"}}')
    assert type(err) is VllmError


def test_success_body_is_not_parsed_as_json() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="Success: LoRA adapter 'a' added successfully.")

    with VllmClient("http://vllm", transport=httpx.MockTransport(handler)) as client:
        assert client.load_adapter("a", "/p") is None


def test_chat_returns_the_answer_greedy_by_default(client: VllmClient, server: FakeVllm, adapter_dir: Path) -> None:
    client.load_adapter("ns-v1", adapter_dir)
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat("ns-v1", messages, max_tokens=12) == "answer from ns-v1"
    _method, _path, body = [r for r in server.state.requests if r[1] == "/v1/chat/completions"][-1]
    assert body == {"model": "ns-v1", "messages": messages, "max_tokens": 12, "temperature": 0.0}
    with pytest.raises(AdapterNotFound):
        client.chat("ns-v9", messages, max_tokens=12)


def test_a_chat_answer_without_choices_is_a_vllm_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"choices": []}))
    with VllmClient("http://vllm", transport=transport, retries=0) as c, pytest.raises(VllmError, match="read"):
        c.chat("m", [{"role": "user", "content": "hi"}], max_tokens=4)


def test_teacher_answers_come_from_the_first_replica_that_answers_them(tmp_path: Path, adapter_dir: Path) -> None:
    from service.config import Settings
    from service.jobs.distill import vllm_teacher_responses

    conversations = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    with FakeVllm() as without, FakeVllm() as serving:
        with VllmClient(serving.url) as c:
            c.load_adapter("ns-v1", adapter_dir)
        dead = f"http://127.0.0.1:{_free_port()}"
        settings = Settings(auth_disabled=True, vllm_urls=[dead, without.url, serving.url], vllm_timeout_s=2.0)
        # the dead replica is skipped, the one without the adapter answers 404 and is passed over
        assert vllm_teacher_responses(settings, "ns-v1", conversations, max_tokens=8) == ["answer from ns-v1"] * 2
        assert without.calls("/v1/chat/completions") == 1 and serving.calls("/v1/chat/completions") == 2
        settings = Settings(auth_disabled=True, vllm_urls=[dead, without.url], vllm_timeout_s=2.0)
        assert vllm_teacher_responses(settings, "ns-v1", conversations, max_tokens=8) is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
