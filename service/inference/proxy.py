"""The inference proxy behind `/v1/*`: resolves the stable alias `<namespace>` to the served name
of its current version (`<namespace>-v<N>`), or one version's own served name to that version
(`pinned`: the caller makes sure it is loaded), forwards the OpenAI request to a healthy vLLM
replica (round-robin, streaming passed through chunk by chunk) and assembles the assistant's
answer so the route can log the conversation. Knows no HTTP framework and no SQL beyond
AdapterRepository; the alias never resolves to the bare base model (v0 stands for it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from deploy.hotswap import parse_served_name, served_name
from memory_store.errors import NotFound
from memory_store.repositories import AdapterRepository
from service.config import Settings
from service.errors import ApiError, openai_error_body

logger = logging.getLogger(__name__)

SERVED_MODEL_HEADER = "X-Loraloop-Served-Model"
CONVERSATION_HEADER = "X-Loraloop-Conversation-Id"


class ProxyError(ApiError):
    """An inference request that cannot be answered; answers in OpenAI's error shape (`param` = the
    field at fault)."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, field=param, retry_after_s=retry_after_s)

    @property
    def param(self) -> str | None:
        return self.field

    def body(self) -> dict[str, Any]:
        return openai_error_body(self.message, self.error_type, self.status_code, self.param)


class InvalidInferenceRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ProxyError):
    """The alias names no adapter, or one that has never had a servable version."""

    status_code = 404
    error_type = "model_not_found"


class VersionNotFound(ModelNotFound):
    """`<namespace>-v<N>` names an existing namespace but a version it does not have."""


class ModelNotReady(ProxyError):
    """The current version is not (yet) loaded on any replica, e.g. right after a vLLM restart."""

    status_code = 503
    error_type = "model_not_ready"


class InferenceUnavailable(ProxyError):
    """No vLLM replica could be reached."""

    status_code = 503
    error_type = "inference_unavailable"


class UpstreamError(ProxyError):
    """vLLM answered with an error; its status and message are passed on."""

    error_type = "upstream_error"

    def __init__(self, status_code: int, message: str, error_type: str | None, param: str | None) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code
        if error_type:
            self.error_type = error_type


def upstream_error(status: int, body: bytes) -> ProxyError:
    """Map a vLLM error answer: its JSON error keeps status, message and type; anything else
    (an HTML 502 from a balancer, FastAPI's `{"detail"}`) becomes a generic upstream error."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or f"vLLM answered {status}")
        param = error.get("param")
        return UpstreamError(
            status, message, str(error.get("type") or "") or None, param if isinstance(param, str) else None
        )
    if isinstance(payload, dict) and "detail" in payload:
        return UpstreamError(status, f"vLLM answered {status}: {payload['detail']}", None, None)
    if status in (502, 503, 504):
        return InferenceUnavailable(f"vLLM answered {status}", retry_after_s=1)
    text = body.decode("utf-8", "replace")[:300]
    return UpstreamError(status, f"vLLM answered {status}: {text}", None, None)


def is_unknown_model(error: ProxyError) -> bool:
    """vLLM's answer for a `model` it does not serve (an adapter not loaded on that replica)."""
    return isinstance(error, UpstreamError) and error.status_code == 404


# --- alias resolution --------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    alias: str  # the namespace
    version: int
    served_name: str
    pinned: bool = False  # asked by the version's own name, not through the alias


def resolve_model(session: Session, name: str) -> ResolvedModel:
    """`name` is an alias (a namespace: its current version) or one version's served name
    `<namespace>-v<N>` (that version, current or not). A namespace called exactly `name` wins.
    Raises ModelNotFound (VersionNotFound for a version the namespace lacks) / ModelNotReady."""
    try:
        return resolve_current(session, name)
    except ModelNotFound:
        parsed = parse_served_name(name)
        if parsed is None:
            raise
        namespace, version = parsed
        repository = AdapterRepository(session)
        try:
            repository.get_adapter(name=namespace)
        except NotFound:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model") from None
        if not repository.has_version(name=namespace, version=version):
            raise VersionNotFound(
                f"the model {name!r} does not exist: {namespace!r} has no version {version}", param="model"
            ) from None
        return ResolvedModel(alias=namespace, version=version, served_name=name, pinned=True)


def resolve_current(session: Session, alias: str) -> ResolvedModel:
    """The current version of adapter `alias` (raises ModelNotFound / ModelNotReady)."""
    try:
        current = AdapterRepository(session).current(name=alias)
    except NotFound:
        raise ModelNotFound(f"the model {alias!r} does not exist", param="model") from None
    if current is None:
        raise ModelNotReady(
            f"the model {alias!r} has no current version yet (its v0 is being prepared)", retry_after_s=2
        )
    return ResolvedModel(
        alias=alias, version=current.version, served_name=served_name(alias, current.version)
    )


class AliasResolver:
    """Alias -> current served name (or a version's own name -> that version), read from the registry and cached for `ttl_s` (a swap is
    seen by every request at most ttl_s later; old versions drain for longer than that)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session_factory = session_factory
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, ResolvedModel]] = {}

    def cached(self, alias: str) -> ResolvedModel | None:
        with self._lock:
            entry = self._cache.get(alias)
        if entry is None or self._clock() - entry[0] >= self.ttl_s:
            return None
        return entry[1]

    def resolve(self, alias: str, *, fresh: bool = False) -> ResolvedModel:
        """Blocking (a database read on a cache miss): call it from a worker thread."""
        if not fresh:
            hit = self.cached(alias)
            if hit is not None:
                return hit
        now = self._clock()
        with self._session_factory() as session:
            resolved = resolve_model(session, alias)
        with self._lock:
            self._cache[alias] = (now, resolved)
        return resolved


# --- replicas ------------------------------------------------------------------------------------


class ReplicaPool:
    """Round-robin over replica URLs; one that refused a connection sits out `cooldown_s`
    (it is still tried, last, when every replica is cooling down)."""

    def __init__(
        self, urls: Sequence[str], *, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.urls = list(urls)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0
        self._down_until: dict[str, float] = {}

    def order(self) -> list[str]:
        """Every replica once: healthy ones in round-robin order first, cooling ones after."""
        if not self.urls:
            return []
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.urls)
            now = self._clock()
            rotated = self.urls[start:] + self.urls[:start]
            healthy = [u for u in rotated if self._down_until.get(u, 0.0) <= now]
            cooling = [u for u in rotated if self._down_until.get(u, 0.0) > now]
        return healthy + cooling

    def mark_down(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = self._clock() + self.cooldown_s

    def mark_up(self, url: str) -> None:
        with self._lock:
            self._down_until.pop(url, None)


# --- the answer ----------------------------------------------------------------------------------


def assistant_message(kind: str, response: Mapping[str, Any]) -> dict[str, Any] | None:
    """The first choice of a non-streamed answer as a stored message."""
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0], Mapping):
        return None
    choice = choices[0]
    if kind == "completions":
        return {"role": "assistant", "content": choice.get("text") or ""}
    message = choice.get("message") or {}
    stored: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        stored["tool_calls"] = message["tool_calls"]
    return stored


@dataclass
class StreamAssembler:
    """Reads the SSE bytes passing through and rebuilds choice 0's text (and tool calls):
    lines `data: {json}`, ended by `data: [DONE]`."""

    kind: str
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    _pending: bytes = b""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if "error" in event:
            self.error = str(event["error"])
            return
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.kind == "completions":
                self.content.append(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                self._merge_tool_call(call)

    def _merge_tool_call(self, call: Mapping[str, Any]) -> None:
        slot = self.tool_calls.setdefault(
            int(call.get("index", 0)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict[str, Any]:
        stored: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.tool_calls:
            stored["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return stored


# --- forwarding ----------------------------------------------------------------------------------


@dataclass
class UpstreamResponse:
    """An open vLLM answer (status < 400): `response` is streamed by the caller, who must close it."""

    resolved: ResolvedModel
    replica: str
    response: httpx.Response


class InferenceProxy:
    """Forwards OpenAI requests for an alias to vLLM. One per app; `aclose()` at shutdown."""

    def __init__(
        self,
        resolver: AliasResolver,
        replicas: ReplicaPool,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.resolver = resolver
        self.replicas = replicas
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, session_factory: sessionmaker[Session], **kwargs: Any
    ) -> InferenceProxy:
        """The proxy over the replicas of Settings.vllm_urls (none configured: every request
        answers 503 at once)."""
        from service.adapters.registry import vllm_base_urls  # the registry pulls in torch; only here

        return cls(
            AliasResolver(session_factory, settings.alias_cache_ttl_s),
            ReplicaPool(vllm_base_urls(settings)),
            timeout_s=settings.inference_timeout_s,
            connect_timeout_s=settings.inference_connect_timeout_s,
            **kwargs,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def open(self, path: str, body: dict[str, Any], resolve: Callable[..., Any]) -> UpstreamResponse:
        """Send `body` (its `model` an alias or a version's served name) to `path` on a replica and return the open answer.

        `resolve(alias, fresh=bool)` is the (awaitable) alias lookup. A replica that refuses the
        connection is skipped; one that does not serve the resolved name (404) is skipped too,
        and after every replica said so the alias is resolved again from the database once (a
        swap may just have retired the cached name). Raises a ProxyError otherwise."""
        alias = body.get("model")
        if not isinstance(alias, str) or not alias:
            raise InvalidInferenceRequest(
                "`model` must be the adapter alias (a namespace name)", param="model"
            )
        resolved: ResolvedModel = await resolve(alias, fresh=False)
        for attempt in range(2):
            try:
                return await self._send_to_any(path, body, resolved)
            except ProxyError as error:
                if not is_unknown_model(error):
                    raise
                last = error
            if attempt == 0:
                # a pinned version is loaded again by `resolve` (fresh): the same name is retried
                fresher: ResolvedModel = await resolve(alias, fresh=True)
                if fresher.served_name == resolved.served_name and not fresher.pinned:
                    break
                resolved = fresher
        which = "asked version" if resolved.pinned else "current version"
        raise ModelNotReady(
            f"{resolved.served_name} ({which} of {resolved.alias!r}) is not loaded on any vLLM replica yet: "
            f"{last.message}",
            retry_after_s=1,
        )

    async def _send_to_any(
        self, path: str, body: dict[str, Any], resolved: ResolvedModel
    ) -> UpstreamResponse:
        forwarded = {**body, "model": resolved.served_name}
        unknown: ProxyError | None = None
        failures: list[str] = []
        for url in self.replicas.order():
            request = self._http.build_request("POST", f"{url}{path}", json=forwarded)
            try:
                response = await self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self.replicas.mark_down(url)
                failures.append(f"{url}: {type(exc).__name__}")
                continue
            except httpx.TransportError as exc:
                # the request may have reached vLLM: do not resend it elsewhere
                raise InferenceUnavailable(
                    f"vLLM at {url} failed: {type(exc).__name__}", retry_after_s=1
                ) from exc
            self.replicas.mark_up(url)
            if response.status_code < 400:
                return UpstreamResponse(resolved, url, response)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            error = upstream_error(response.status_code, content)
            if is_unknown_model(error):
                unknown = error
                continue
            raise error
        if unknown is not None:
            raise unknown
        if not failures:
            raise InferenceUnavailable("no vLLM is configured (LORALOOP_VLLM_URLS is empty)")
        raise InferenceUnavailable(
            "no vLLM replica is reachable (" + "; ".join(failures) + ")", retry_after_s=1
        )


async def passthrough(
    upstream: UpstreamResponse, assembler: StreamAssembler, on_finish: Callable[[StreamAssembler], Any]
) -> AsyncIterator[bytes]:
    """Yield vLLM's bytes as they arrive (no buffering), feeding the assembler; on a broken
    stream emit one SSE error event. `on_finish(assembler)` runs at the end, whatever happened."""
    try:
        async for chunk in upstream.response.aiter_bytes():
            assembler.feed(chunk)
            yield chunk
    except httpx.HTTPError as exc:
        logger.warning("stream from %s broke: %s", upstream.replica, exc)
        assembler.error = f"{type(exc).__name__}: {exc}"
        event = openai_error_body("the vLLM stream broke off", "inference_unavailable", 503)
        yield b"data: " + json.dumps(event).encode() + b"\n\n"
    finally:
        await upstream.response.aclose()
        await on_finish(assembler)
