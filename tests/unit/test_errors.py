"""One error base: every error the service raises on purpose leaves through one handler, in
loraloop's shape for the API and OpenAI's for the gateway, with its own headers."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.errors import ApiError, BodyTooLarge, InvalidField, Unauthenticated, install_error_handlers
from service.inference.proxy import ModelNotReady, ProxyError, UpstreamError, upstream_error

RAISED = {
    "invalid": InvalidField("limit: must be at most 500", field="limit"),
    "unauthenticated": Unauthenticated("missing bearer token"),
    "too-large": BodyTooLarge(1024),
    "not-ready": ModelNotReady("the model 'ns' has no current version yet", retry_after_s=2),
    "upstream": UpstreamError(429, "too many requests", "rate_limited", "messages"),
}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    def raise_it(name: str) -> None:
        raise RAISED[name]

    return TestClient(app)


def test_the_gateway_errors_share_the_one_base() -> None:
    assert issubclass(ProxyError, ApiError)
    error = upstream_error(502, b"<html>bad gateway</html>")
    assert isinstance(error, ApiError) and error.status_code == 503


def test_an_api_error_answers_in_loraloop_shape_with_the_field(client: TestClient) -> None:
    response = client.get("/raise/invalid")
    assert response.status_code == 422
    assert response.json() == {
        "error": {"type": "invalid_request", "message": "limit: must be at most 500", "field": "limit"}
    }
    assert "retry-after" not in response.headers


def test_unauthenticated_names_the_scheme_and_too_large_names_the_limit(client: TestClient) -> None:
    response = client.get("/raise/unauthenticated")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    response = client.get("/raise/too-large")
    assert response.status_code == 413
    assert response.json()["error"] == {
        "type": "body_too_large",
        "message": "request body exceeds the limit of 1024 bytes",
        "field": "body",
        "limit_bytes": 1024,
    }


def test_a_gateway_error_answers_in_openai_shape_with_retry_after(client: TestClient) -> None:
    response = client.get("/raise/not-ready")
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert response.json() == {
        "error": {
            "message": "the model 'ns' has no current version yet",
            "type": "model_not_ready",
            "param": None,
            "code": 503,
        }
    }
    response = client.get("/raise/upstream")
    assert response.status_code == 429
    assert response.json()["error"] == {
        "message": "too many requests",
        "type": "rate_limited",
        "param": "messages",
        "code": 429,
    }
