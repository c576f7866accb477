"""OpenAI-compatible inference routes: `POST /v1/chat/completions`, `POST /v1/completions`
(streaming included) and `GET /v1/models`, addressed by the stable alias `<namespace>`, or by one
version's own name `<namespace>-v<N>` (an operator asking an older version or a candidate: it is
loaded for a while, AdapterRegistry.preview).

Forwarding lives in service.inference.proxy; this module parses the body, logs chat conversations
(so `POST /feedback` can name one by `conversation_id`) and returns their id in
`X-Loraloop-Conversation-Id`. A namespace's first request creates and loads its v0 (the base
model), so an agent can use its alias before any feedback was trained. A token bound to some
namespaces sees only their aliases: any other is an unknown model (404), never created.
Raw-text `/v1/completions` are forwarded but not logged: a prompt string is not a conversation
(feedback for those uses `context` + `continuation`).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from deploy.hotswap import parse_served_name, served_name
from memory_store.errors import Conflict
from memory_store.repositories import AdapterRepository, ConversationRepository
from service.api.auth import Principal
from service.api.deps import AuthenticatedRoute, PrincipalDep, SessionDep, principal_of, require
from service.api.routes.adapters import adapter_registry
from service.api.schemas import check_namespace
from service.inference.proxy import (
    CONVERSATION_HEADER,
    SERVED_MODEL_HEADER,
    InferenceProxy,
    InvalidInferenceRequest,
    ModelNotFound,
    ModelNotReady,
    ResolvedModel,
    StreamAssembler,
    VersionNotFound,
    assistant_message,
    passthrough,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["inference"], route_class=AuthenticatedRoute)

CONVERSATION_SOURCE = "openai-proxy"


def _proxy(request: Request) -> InferenceProxy:
    return request.app.state.inference_proxy


async def _json_body(request: Request, kind: str) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise InvalidInferenceRequest(f"the body is not valid JSON: {exc}", param="body") from exc
    except RecursionError as exc:  # e.g. 100k nested arrays: the decoder runs out of stack
        raise InvalidInferenceRequest("the body is nested too deeply", param="body") from exc
    if not isinstance(body, dict):
        raise InvalidInferenceRequest("the body must be a JSON object", param="body")
    if kind == "chat" and not (isinstance(body.get("messages"), list) and body["messages"]):
        raise InvalidInferenceRequest("`messages` must be a non-empty list", param="messages")
    if kind == "completions" and "prompt" not in body:
        raise InvalidInferenceRequest("`prompt` is required", param="prompt")
    return body


def _start_conversation(
    factory: sessionmaker[Session], resolved: ResolvedModel, messages: list[Any], created_by: str | None
) -> int | None:
    """Store the request's messages; None (and a warning) when the store is unavailable: the
    answer still goes out, only without a conversation id."""
    try:
        with factory.begin() as session:
            row = ConversationRepository(session).add(
                namespace=resolved.alias,
                messages=messages,
                model=resolved.served_name,
                source=CONVERSATION_SOURCE,
                created_by=created_by,
            )
            return row.id
    except Exception:
        logger.warning("could not log a conversation of %s", resolved.alias, exc_info=True)
        return None


def _append_answer(factory: sessionmaker[Session], conversation_id: int, message: dict[str, Any]) -> None:
    try:
        with factory.begin() as session:
            row = ConversationRepository(session).get(id=conversation_id)
            row.messages = [*row.messages, message]
    except Exception:
        logger.warning("could not store the answer of conversation %s", conversation_id, exc_info=True)


def is_namespace(alias: str) -> bool:
    try:
        check_namespace(alias)
    except ValueError:
        return False
    return True


def serve_base_version(request: Request, alias: str) -> None:
    """Create and load the namespace's v0 (identical to the base model); ModelNotReady when no
    vLLM replica can load it yet."""
    from service.adapters.registry import PromotionFailed  # the registry pulls in torch: only when used

    try:
        adapter_registry(request).ensure_base_version(alias)
    except PromotionFailed as error:
        raise ModelNotReady(
            f"the model {alias!r} is being prepared: its v0 (the base model) is not loaded yet ({error.reason})",
            retry_after_s=5,
        ) from error
    logger.info("namespace %s served from its first request (v0, the base model)", alias)


def serve_pinned_version(request: Request, resolved: ResolvedModel, *, reload: bool) -> None:
    """Have vLLM serve a version asked by its own name (`<namespace>-v<N>`), current or not
    (service.adapters.registry.AdapterRegistry.preview); a tombstone is an unknown model, a replica that
    cannot load it a model not ready."""
    from service.adapters.registry import PromotionFailed  # the registry pulls in torch: only when used

    try:
        adapter_registry(request).preview(resolved.alias, resolved.version, reload=reload)
    except Conflict as error:
        raise ModelNotFound(f"the model {resolved.served_name!r} cannot be served: {error}", param="model") from None
    except PromotionFailed as error:
        raise ModelNotReady(
            f"the model {resolved.served_name!r} could not be loaded ({error.reason})", retry_after_s=5
        ) from error


async def _forward(request: Request, path: str, kind: str) -> Response:
    return await forward(request, path, kind, await _json_body(request, kind))


async def forward(request: Request, path: str, kind: str, body: dict[str, Any]) -> Response:
    """Send a parsed, checked `body` through the gateway (also the dashboard's chat box): alias
    resolution, a namespace's first v0, conversation logging, streaming."""
    proxy = _proxy(request)
    factory: sessionmaker[Session] = request.app.state.session_factory
    principal: Principal = principal_of(request)

    async def resolve(name: str, *, fresh: bool) -> ResolvedModel:
        parsed = parse_served_name(name)
        if not principal.allows_namespace(name) and not (parsed and principal.allows_namespace(parsed[0])):
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        resolved = None if fresh else proxy.resolver.cached(name)
        if resolved is None:
            try:
                resolved = await anyio.to_thread.run_sync(partial(proxy.resolver.resolve, name, fresh=fresh))
            except (ModelNotFound, ModelNotReady) as error:
                if not principal.allows_namespace(name):  # let through for its namespace only
                    if isinstance(error, VersionNotFound):
                        raise
                    raise ModelNotFound(f"the model {name!r} does not exist", param="model") from None
                if isinstance(error, VersionNotFound) or not is_namespace(name):
                    raise
                # a namespace's first request: it is served from day one, by its v0 (the base model)
                await anyio.to_thread.run_sync(serve_base_version, request, name)
                resolved = await anyio.to_thread.run_sync(partial(proxy.resolver.resolve, name, fresh=True))
        if not principal.allows_namespace(resolved.alias):
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        if resolved.pinned:  # asked by a version's own name: load it for a while unless it is served
            await anyio.to_thread.run_sync(partial(serve_pinned_version, request, resolved, reload=fresh))
        return resolved

    upstream = await proxy.open(path, body, resolve)
    resolved = upstream.resolved
    headers = {SERVED_MODEL_HEADER: resolved.served_name}
    logged = kind == "chat"
    conversation_id: int | None = None
    if logged:
        conversation_id = await anyio.to_thread.run_sync(
            _start_conversation, factory, resolved, body["messages"], principal.label
        )
        if conversation_id is not None:
            headers[CONVERSATION_HEADER] = str(conversation_id)

    if body.get("stream"):

        async def finish(assembler: StreamAssembler) -> None:
            if conversation_id is not None and assembler.done and assembler.error is None:
                await anyio.to_thread.run_sync(_append_answer, factory, conversation_id, assembler.message())

        return StreamingResponse(
            passthrough(upstream, StreamAssembler(kind), finish),
            status_code=upstream.response.status_code,
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    try:
        content = await upstream.response.aread()
    finally:
        await upstream.response.aclose()
    if conversation_id is not None:
        try:
            message = assistant_message(kind, json.loads(content))
        except ValueError:
            message = None
        if message is not None:
            await anyio.to_thread.run_sync(_append_answer, factory, conversation_id, message)
    return Response(
        content,
        status_code=upstream.response.status_code,
        media_type=upstream.response.headers.get("content-type", "application/json"),
        headers=headers,
    )


@router.post("/v1/chat/completions", dependencies=[require("inference")])
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completion for `model: <namespace>`, answered by its current adapter version."""
    return await _forward(request, "/v1/chat/completions", "chat")


@router.post("/v1/completions", dependencies=[require("inference")])
async def completions(request: Request) -> Response:
    """OpenAI text completion for `model: <namespace>` (not logged as a conversation)."""
    return await _forward(request, "/v1/completions", "completions")


@router.get("/v1/models", dependencies=[require("inference")])
def list_models(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    """The aliases that can be addressed now: every adapter with a current version (of the
    token's namespaces)."""
    data = [
        {
            "id": adapter.name,
            "object": "model",
            "created": int(adapter.created_at.timestamp()),
            "owned_by": "loraloop",
            "root": served_name(adapter.name, adapter.current_version),
            "parent": adapter.base_model,
        }
        for adapter in AdapterRepository(session).list_with_versions(namespace_patterns=principal.namespaces)
        if adapter.current_version is not None
    ]
    return {"object": "list", "data": data}
