"""HTTP client for one vLLM OpenAI-compatible server: runtime LoRA load/unload, model listing,
health, chat-template tokenization, a (non-streamed) chat completion and sleep mode, with our
exceptions instead of HTTP details. The OpenAI gateway's streaming pass-through is the one other
caller of vLLM's HTTP API (service.inference.proxy, async, bytes forwarded as they come).

Owns retries with exponential backoff and the error mapping. Knows nothing of the registry, the
database or which version is current: deploy.hotswap decides what to load, the service calls it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import httpx

T = TypeVar("T")

# Statuses that mean "try again later" whatever the body says.
_TRANSIENT_STATUSES = frozenset({502, 503, 504})


class VllmError(Exception):
    """vLLM answered with an error (or not in the way its API promises)."""

    def __init__(
        self, message: str, *, status: int | None = None, error_type: str | None = None, base_url: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.base_url = base_url


class VllmUnavailable(VllmError):
    """vLLM could not be reached, timed out, or kept answering 5xx after every retry."""


class AdapterAlreadyLoaded(VllmError):
    """400: an adapter of that name is already loaded (and `load_inplace` was not set)."""


class AdapterNotFound(VllmError):
    """404: unknown adapter name, or the adapter path does not hold a loadable adapter."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of GET /v1/models. `parent` is None for a base model, the base's name for an adapter."""

    id: str
    root: str | None = None
    parent: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def error_from_response(status: int, body: bytes, *, base_url: str = "") -> VllmError:
    """Map a non-2xx vLLM answer to our exception. vLLM's own errors are JSON
    `{"error": {"message", "type", "param", "code"}}`; anything else (e.g. FastAPI's
    `{"detail": "Not Found"}` for a route that is not enabled) is a plain VllmError."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        text = body.decode("utf-8", "replace")[:500]
        cls = VllmUnavailable if status in _TRANSIENT_STATUSES else VllmError
        return cls(f"vLLM answered {status}: {text}", status=status, base_url=base_url)
    message = str(error.get("message", ""))
    error_type = str(error.get("type", "")) or None
    if status == 404:
        cls = AdapterNotFound
    elif status == 400 and "already been loaded" in message:
        cls = AdapterAlreadyLoaded
    elif status in _TRANSIENT_STATUSES:
        cls = VllmUnavailable
    else:
        cls = VllmError
    return cls(message or f"vLLM answered {status}", status=status, error_type=error_type, base_url=base_url)


def _is_vllm_error_body(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict)


def _is_transient(response: httpx.Response) -> bool:
    """502/503/504 always; another 5xx only when it is not one of vLLM's deliberate JSON errors
    (a 500 `{"error": ...}` from load_lora_adapter is a definitive answer, e.g. a corrupt file)."""
    if response.status_code in _TRANSIENT_STATUSES:
        return True
    return response.status_code >= 500 and not _is_vllm_error_body(response.content)


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API request and how to read its success answer.

    `settled_by`: an error that, when it follows an attempt whose outcome is unknown (a transport
    error after the request may have reached vLLM), means that earlier attempt succeeded."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    body: Mapping[str, Any] | None = None
    params: Sequence[tuple[str, str]] = ()
    settled_by: type[VllmError] | None = None
    settled_value: Any = None


def _none(_: httpx.Response) -> None:
    return None


def _parse_models(response: httpx.Response) -> list[ServedModel]:
    data = response.json().get("data", [])
    return [ServedModel(id=m["id"], root=m.get("root"), parent=m.get("parent")) for m in data]


def _load_call(name: str, path: str | Path, inplace: bool) -> _Call[None]:
    body: dict[str, Any] = {"lora_name": name, "lora_path": str(path)}
    if inplace:
        body["load_inplace"] = True
    return _Call("POST", "/v1/load_lora_adapter", _none, body, settled_by=AdapterAlreadyLoaded)


def _unload_call(name: str) -> _Call[None]:
    return _Call("POST", "/v1/unload_lora_adapter", _none, {"lora_name": name}, settled_by=AdapterNotFound)


def _tokenize_call(
    messages: Sequence[Mapping[str, Any]] | None,
    prompt: str | None,
    model: str | None,
    add_generation_prompt: bool,
    add_special_tokens: bool | None,
) -> _Call[list[int]]:
    if (messages is None) == (prompt is None):
        raise ValueError("tokenize() takes exactly one of messages= or prompt=")
    body: dict[str, Any] = {}
    if model is not None:
        body["model"] = model
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
        body["add_generation_prompt"] = add_generation_prompt
        body["add_special_tokens"] = bool(add_special_tokens)  # the chat template places specials
    else:
        body["prompt"] = prompt
        body["add_special_tokens"] = True if add_special_tokens is None else add_special_tokens
    return _Call("POST", "/tokenize", lambda r: [int(t) for t in r.json()["tokens"]], body)


def _chat_content(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        reason = f"vLLM's chat answer could not be read ({type(exc).__name__})"
        raise VllmError(reason, status=response.status_code) from exc
    return content or ""


def _chat_call(
    model: str, messages: Sequence[Mapping[str, Any]], max_tokens: int, temperature: float
) -> _Call[str]:
    body = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    return _Call("POST", "/v1/chat/completions", _chat_content, body)


def _sleep_call(level: int) -> _Call[None]:
    return _Call("POST", "/sleep", _none, params=(("level", str(level)),))


def _wake_up_call(tags: Sequence[str] | None) -> _Call[None]:
    return _Call("POST", "/wake_up", _none, params=tuple(("tags", t) for t in tags or ()))


def _is_sleeping_call() -> _Call[bool]:
    return _Call("GET", "/is_sleeping", lambda r: bool(r.json()["is_sleeping"]))


class _Attempts(Generic[T]):
    """The retry state machine of one call (no I/O here)."""

    def __init__(self, call: _Call[T], base_url: str, retries: int) -> None:
        self.call = call
        self.base_url = base_url
        self.retries = retries
        self.ambiguous = False  # an earlier attempt may have reached vLLM
        self.last_error: VllmError | None = None

    def on_transport_error(self, exc: httpx.TransportError) -> None:
        """Record a failed attempt; raise at once when retrying cannot help."""
        where = f"{self.call.method} {self.base_url}{self.call.path}"
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            raise VllmUnavailable(
                f"{where} timed out ({type(exc).__name__})", base_url=self.base_url
            ) from exc
        self.ambiguous = self.ambiguous or not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        self.last_error = VllmUnavailable(f"{where}: {type(exc).__name__}: {exc}", base_url=self.base_url)

    def on_response(self, response: httpx.Response) -> tuple[bool, T | None]:
        """(done, value) for a final answer; raises a non-retryable error; (False, None) to retry."""
        if response.status_code < 400:
            return True, self.call.parse(response)
        error = error_from_response(response.status_code, response.content, base_url=self.base_url)
        if self.ambiguous and self.call.settled_by is not None and isinstance(error, self.call.settled_by):
            return True, self.call.settled_value
        if not _is_transient(response):
            raise error
        self.last_error = error
        return False, None

    def give_up(self) -> VllmUnavailable:
        message = f"vLLM at {self.base_url} unavailable after {self.retries + 1} attempts"
        if self.last_error is not None:
            message += f": {self.last_error.message}"
        return VllmUnavailable(message, base_url=self.base_url)


class VllmClient:
    """Synchronous client (worker threads, hot-swap). Thread-safe: httpx.Client is."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 30.0,
        retries: int = 3,
        *,
        backoff_s: float = 0.25,
        max_backoff_s: float = 4.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"VllmClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        attempts = _Attempts(call, self.base_url, self.retries)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                response = self._http.request(
                    call.method, call.path, json=call.body, params=list(call.params)
                )
            except httpx.TransportError as exc:
                attempts.on_transport_error(exc)
                continue
            done, value = attempts.on_response(response)
            if done:
                return value  # type: ignore[return-value]
        raise attempts.give_up()

    def health(self) -> bool:
        """True when GET /health answers 200 now (one quick attempt, no retries)."""
        try:
            return self._http.get("/health", timeout=min(self.timeout, 5.0)).status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> list[ServedModel]:
        return self._run(_Call("GET", "/v1/models", _parse_models))

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: served name -> path."""
        return {m.id: m.root or "" for m in self.models() if m.is_adapter}

    def load_adapter(self, name: str, path: str | Path, inplace: bool = False) -> None:
        self._run(_load_call(name, path, inplace))

    def unload_adapter(self, name: str) -> None:
        self._run(_unload_call(name))

    def tokenize(
        self,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | None = None,
        model: str | None = None,
        add_generation_prompt: bool = True,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """Token ids vLLM builds for chat `messages` (its chat template, generation prompt on) or a
        raw `prompt` (special tokens added unless add_special_tokens=False)."""
        return self._run(_tokenize_call(messages, prompt, model, add_generation_prompt, add_special_tokens))

    def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], *, max_tokens: int, temperature: float = 0.0
    ) -> str:
        """The assistant's answer (text) of one chat completion by `model` (a served name);
        greedy by default. Raises VllmError when the answer cannot be read."""
        return self._run(_chat_call(model, messages, max_tokens, temperature))

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (needs --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1)."""
        self._run(_sleep_call(level))

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self._run(_wake_up_call(tags))

    def is_sleeping(self) -> bool:
        return self._run(_is_sleeping_call())
