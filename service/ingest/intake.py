"""Feedback ingestion: the checks that need more than the schema, then one idempotent store.

`FeedbackValidator` holds the tokenizer and `RenderConfig` and runs training.render's checks
(target_index, continuation length in tokens) on the item the worker will later render.
`feedback_unit` / `feedback_batch_unit` check a request's items (refusing a namespace outside the
token's grant, resolving `conversation_id`, checking the configurable limits; the items carry the
token's audit label) into a `StoreUnit`, which `service.ingest.writer` stores in
its transaction before `enqueue_training` queues one debounced `train` job per namespace; once vLLM
answers again, `wake_waiting` makes the jobs waiting for it due and `requeue_stranded` gives a
namespace whose last train job died (its cause since gone) a new one. Nothing heavy runs
here: training happens in the worker. Knows nothing about HTTP beyond `InvalidField`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from memory_store.errors import NotFound
from memory_store.models import FeedbackItem, Job, utcnow
from memory_store.queue import JobQueue
from memory_store.repositories import ConversationRepository, FeedbackRepository, NewFeedback
from service.api.auth import Principal, ensure_may_write
from service.api.errors import InvalidField
from service.api.schemas import DERIVED_KEY_SEPARATOR, FeedbackBatchItem, FeedbackCreate, Message
from service.component_configs import render_config
from service.config import Settings
from service.ingest.message_checks import check_context, check_tool_messages
from training.render import RenderError, resolve_target_index, validate_feedback

logger = logging.getLogger(__name__)

TRAIN_JOB_KIND = "train"


def train_dedupe_key(namespace: str) -> str:
    return f"train:{namespace}"


@lru_cache(maxsize=4)
def _shared_tokenizer(path: str) -> tuple[Any, threading.Lock]:
    """One tokenizer per folder per process (apps in one process share it), with its lock:
    fast tokenizers are not safe to call from several threads at once."""
    from training.tokenizer_files import load_tokenizer

    return load_tokenizer(path), threading.Lock()


class FeedbackValidator:
    """Checks a feedback item against the tokenizer of the base model, as the worker will see it.

    The tokenizer is loaded by `load()` (at app start). When `Settings.tokenizer_path` does not
    exist, only the tokenizer-free checks run and a warning says so once.
    """

    def __init__(self, settings: Settings) -> None:
        self.tokenizer_path = Path(settings.tokenizer_path)
        self.config = render_config(settings)
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._loaded = False
        self._load_lock = threading.Lock()

    def load(self) -> None:
        with self._load_lock:
            if self._loaded:
                return
            self._loaded = True
            if not self.tokenizer_path.exists():
                logger.warning(
                    "tokenizer %s not found: feedback is accepted without the continuation length check "
                    "(set LORALOOP_TOKENIZER or build the base model)",
                    self.tokenizer_path,
                )
                return
            self._tokenizer, self._tokenizer_lock = _shared_tokenizer(str(self.tokenizer_path.resolve()))
            logger.info("feedback validation uses the tokenizer at %s", self.tokenizer_path)

    def validate(self, item: dict[str, Any]) -> None:
        """Raise `RenderError(field, reason)` for an item that could never become an example."""
        resolve_target_index(item["messages"], item.get("target_index"))
        if self._tokenizer is None:
            return
        with self._tokenizer_lock:
            validate_feedback(self._tokenizer, item, self.config)

    def inspect(self, item: dict[str, Any]) -> list[Any] | None:
        """`loraloop inspect`'s token rows of a stored item (training.example_view.TokenRow: piece, id,
        trained), or None without a tokenizer or when the item does not render."""
        if self._tokenizer is None:
            return None
        from training.example_view import token_table
        from training.render import RenderError, render_example

        if isinstance(item.get("messages"), list) and item.get("target_index") is None:
            item = {**item, "target_index": default_target_index(item["messages"])}
        with self._tokenizer_lock:
            try:
                example = render_example(self._tokenizer, item, self.config)
            except (RenderError, ValueError):
                return None
            return None if example is None else token_table(self._tokenizer, example)


def default_target_index(messages: Sequence[dict[str, Any]]) -> int:
    """The API's default `target_index`: the last message when it is an assistant turn (replace
    it), else `len(messages)` (append a new assistant turn). Items are stored with the resolved
    index, so the worker never applies a default of its own."""
    return resolve_target_index(messages, None)


def message_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as stored: OpenAI shape, unset optional fields left out, `content` always present."""
    dumped = []
    for message in messages:
        data = message.model_dump(mode="json", exclude_none=True)
        data.setdefault("content", None)
        dumped.append(data)
    return dumped


@dataclass(frozen=True)
class AcceptedItem:
    item: FeedbackItem
    created: bool


def _prefixed(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if prefix else field


def _check_limits(body: FeedbackCreate, settings: Settings, prefix: str) -> None:
    if body.messages is not None and len(body.messages) > settings.max_messages:
        raise InvalidField(
            f"at most {settings.max_messages} messages per item (LORALOOP_MAX_MESSAGES)",
            field=_prefixed(prefix, "messages"),
        )


def _prepare(
    session: Session | None,
    body: FeedbackCreate,
    *,
    idempotency_key: str | None,
    settings: Settings,
    validator: FeedbackValidator,
    prefix: str,
    principal: Principal,
) -> NewFeedback:
    _check_limits(body, settings, prefix)
    namespace = body.namespace or settings.default_namespace
    ensure_may_write(principal, namespace, field=_prefixed(prefix, "namespace"))
    messages = message_dicts(body.messages) if body.messages is not None else None
    context = messages
    if body.conversation_id is not None:
        if session is None:
            raise ValueError("an item with a conversation_id is prepared in a session")
        try:
            conversation = ConversationRepository(session).get(id=body.conversation_id, namespace=namespace)
        except NotFound:
            raise InvalidField(
                f"conversation {body.conversation_id} does not exist in namespace {namespace!r}",
                field=_prefixed(prefix, "conversation_id"),
            ) from None
        if context is None:
            context = list(conversation.messages)
    assert context is not None  # the schema requires messages or conversation_id
    target_index = default_target_index(context) if body.target_index is None else body.target_index
    if messages is not None:
        check_tool_messages(messages, field=_prefixed(prefix, "messages"))
    context_field = "messages" if messages is not None else "conversation_id"
    check_context(context, target_index, field=_prefixed(prefix, context_field))
    try:
        validator.validate(
            {"messages": context, "target_index": target_index, "continuation": body.continuation}
        )
    except RenderError as error:
        raise InvalidField(f"{error.field}: {error.reason}", field=_prefixed(prefix, error.field)) from error
    return NewFeedback(
        namespace=namespace,
        continuation=body.continuation,
        messages=messages,
        target_index=target_index,
        reason=body.reason,
        memories=body.memories,
        tags=body.tags,
        conversation_id=body.conversation_id,
        idempotency_key=idempotency_key,
        created_by=principal.label,
    )


def queue_train_job(
    session: Session,
    settings: Settings,
    namespace: str,
    *,
    trigger: str,
    run_after: datetime | None = None,
    reschedule: bool = False,
    created_by: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> Job:
    """The one place a `train` job is queued (feedback, the API, the CLI, a run's follow-up, the
    re-queue of a dead one). One active job per namespace: when a job of the namespace is queued or
    running already, that job is answered and absorbs the request. `run_after` None = now; with
    `reschedule`, an absorbing job that is still queued is moved to `run_after` (the debounce
    pushes it back, `loraloop train` and `POST /jobs/train` make it due now)."""
    queue = JobQueue(session, default_max_attempts=settings.job_max_attempts)
    due = utcnow() if run_after is None else run_after
    job = queue.enqueue(
        kind=TRAIN_JOB_KIND,
        namespace=namespace,
        payload={"namespace": namespace, "trigger": trigger, **(payload or {})},
        dedupe_key=train_dedupe_key(namespace),
        run_after=due,
        created_by=created_by,
    )
    if (
        reschedule
        and job.status == "queued"
        and job.run_after != due
        and queue.reschedule(job_id=job.id, run_after=due)
    ):
        set_committed_value(job, "run_after", due)  # what the caller answers, without a second UPDATE
    return job


def enqueue_training(session: Session, namespaces: set[str], settings: Settings) -> None:
    """Trigger a namespace's `train` run: at once when `train_trigger_count` items are pending,
    otherwise `train_debounce_s` after the LAST item (each new item pushes a queued run back).
    The common case, a run of the namespace queued already, is one UPDATE that moves it (the
    pending count decided in the same statement)."""
    feedback = FeedbackRepository(session)
    queue = JobQueue(session)
    now = utcnow()
    later = now + timedelta(seconds=settings.train_debounce_s)
    trigger = settings.train_trigger_count
    for namespace in sorted(namespaces):
        if queue.reschedule_queued(
            dedupe_key=train_dedupe_key(namespace),
            run_after=later,
            now_if_pending=(namespace, trigger),
        ):
            continue
        enough = feedback.count_pending(namespace=namespace, at_most=trigger) >= trigger
        run_after = now if enough else later
        queue_train_job(
            session,
            settings,
            namespace,
            trigger="count" if enough else "debounce",
            run_after=run_after,
            reschedule=True,
        )


def pending_state(session: Session, item: FeedbackItem) -> tuple[str | None, int | None]:
    """What a pending item waits for, in words, and the train job that will take it (None, None
    for an item that is not pending)."""
    if item.status != "pending":
        return None, None
    queue = JobQueue(session)
    job = queue.active_job(dedupe_key=train_dedupe_key(item.namespace)) or queue.newest(
        kind=TRAIN_JOB_KIND, namespace=item.namespace
    )
    if job is None:
        return "training: no train job yet (one is queued with the next feedback or `loraloop train`)", None
    progress = job.progress or {}
    if job.status == "queued" and progress.get("phase") == "waiting":
        return (
            f"{progress.get('waiting_for', 'a dependency')}: {job.error or 'waiting'} "
            f"(job {job.id}, next try {progress.get('next_try_at', 'soon')})"
        ), job.id
    if job.status == "queued":
        return f"training: job {job.id} queued, due at {job.run_after.strftime('%Y-%m-%dT%H:%M:%SZ')}", job.id
    if job.status == "running":
        return f"training: job {job.id} running ({progress.get('phase', 'starting')})", job.id
    if job.status == "dead":
        return (
            f"training: job {job.id} died after {job.attempts} attempts ({job.error}); it is re-queued "
            "once vLLM answers again"
        ), job.id
    return (
        f"training: the last train job ({job.id}) is {job.status}; a new one starts with the next run",
        job.id,
    )


STRANDED_COOLDOWN_S = 60.0  # a dead train job is re-queued at most this often per namespace
MAX_REQUEUES = 5  # consecutive re-queues after which a namespace's dead job waits for a person


def wake_waiting(session: Session, *, limit: int = 100) -> list[int]:
    """Make every train job that waits for vLLM due now (a replica answers again): its candidate is
    promoted on the next claim instead of after the rest of its back-off. Returns their ids."""
    queue = JobQueue(session)
    woken = []
    for job in queue.list(status="queued", kind=TRAIN_JOB_KIND, limit=limit):
        waits = (job.progress or {}).get("waiting_for") == "vllm" and isinstance(
            (job.payload or {}).get("promote"), dict
        )
        if waits and queue.reschedule(job_id=job.id, run_after=utcnow()):
            woken.append(job.id)
    return woken


def requeue_stranded(
    session: Session, settings: Settings, *, cooldown_s: float = STRANDED_COOLDOWN_S
) -> list[str]:
    """Give every namespace whose newest `train` job is `dead` (and older than `cooldown_s`) while
    it still has pending feedback a new train job; returns those namespaces. Called when the
    components training needs are up again (the reconciler, after a round that reached every
    replica). A job re-queued MAX_REQUEUES times in a row that died again is left for a person
    (`loraloop jobs`): the cause is not transient."""
    queue = JobQueue(session, default_max_attempts=settings.job_max_attempts)
    feedback = FeedbackRepository(session)
    now = utcnow()
    requeued: list[str] = []
    for namespace in queue.dead_namespaces(
        kind=TRAIN_JOB_KIND, finished_before=now - timedelta(seconds=cooldown_s)
    ):
        newest = queue.newest(kind=TRAIN_JOB_KIND, namespace=namespace)
        if newest is None or newest.status != "dead" or newest.finished_at is None:
            continue  # a newer job runs, waits or succeeded
        if newest.finished_at >= now - timedelta(seconds=cooldown_s):
            continue
        requeues = int((newest.payload or {}).get("requeues", 0))
        if requeues >= MAX_REQUEUES or not feedback.pending_since(namespace=namespace, limit=1):
            continue
        queue_train_job(
            session,
            settings,
            namespace,
            trigger="requeue",
            run_after=now,
            payload={"requeues": requeues + 1, "requeued_from_job": newest.id},
        )
        logger.warning(
            "train job %d of %s was dead with pending feedback: re-queued (%d/%d)",
            newest.id,
            namespace,
            requeues + 1,
            MAX_REQUEUES,
        )
        requeued.append(namespace)
    return requeued


def batch_item_key(header_key: str | None, index: int, item: FeedbackBatchItem) -> str | None:
    """An item's own `idempotency_key`, else `<Idempotency-Key header>` U+001F `<index>`, else none.

    Client keys (the header and items' own keys) may not hold control characters, so a derived key
    never equals one of them: `order-7#0` sent by a client and item 0 of batch `order-7` are two keys.
    """
    if item.idempotency_key is not None:
        return item.idempotency_key
    if header_key is not None:
        return f"{header_key}{DERIVED_KEY_SEPARATOR}{index}"
    return None


def _check_batch_size(items: Sequence[FeedbackBatchItem], settings: Settings) -> None:
    if len(items) > settings.max_batch_items:
        raise InvalidField(
            f"at most {settings.max_batch_items} items per batch (LORALOOP_MAX_BATCH_ITEMS)", field="items"
        )


@dataclass(frozen=True)
class StoreUnit:
    """What one request stores, for `service.ingest.writer`: items checked already (`prepared`),
    or `prepare(session)` that checks them in the writer's transaction, together with their
    insert (items naming a `conversation_id`, which needs the database). The writer stores the
    items (`store`: idempotent, all or none) and then enqueues training (`enqueue_training`)."""

    prepared: list[NewFeedback] | None = None
    prepare: Callable[[Session], list[NewFeedback]] | None = None

    def items(self, session: Session) -> list[NewFeedback]:
        if self.prepared is not None:
            return self.prepared
        assert self.prepare is not None
        return self.prepare(session)

    @staticmethod
    def store(session: Session, items: Sequence[NewFeedback]) -> list[AcceptedItem]:
        """Store `items` in the caller's transaction, all or none; results in input order."""
        stored = FeedbackRepository(session).add_many(items=items)
        return [AcceptedItem(item=item, created=created) for item, created in stored]


def feedback_unit(
    body: FeedbackCreate,
    *,
    idempotency_key: str | None,
    settings: Settings,
    validator: FeedbackValidator,
    principal: Principal,
) -> StoreUnit:
    """The unit of `POST /feedback`. An item without `conversation_id` is checked here, in the
    caller's thread (it needs no database), so the writer's transaction only stores it. A
    namespace outside `principal`'s grant is refused (403) before anything is stored."""

    def prepare(session: Session | None) -> list[NewFeedback]:
        return [
            _prepare(
                session,
                body,
                idempotency_key=idempotency_key,
                settings=settings,
                validator=validator,
                prefix="",
                principal=principal,
            )
        ]

    if body.conversation_id is not None:
        return StoreUnit(prepare=prepare)
    return StoreUnit(prepared=prepare(None))


def feedback_batch_unit(
    items: Sequence[FeedbackBatchItem],
    *,
    idempotency_key: str | None,
    settings: Settings,
    validator: FeedbackValidator,
    principal: Principal,
) -> StoreUnit:
    """The unit of `POST /feedback:batch`; its items are checked here when none of them names a
    `conversation_id`; every item is checked before any is stored (errors name `items[i].field`).

    Item `i` is idempotent under its own `idempotency_key`, else under `batch_item_key`."""
    _check_batch_size(items, settings)

    def prepare_all(session: Session | None) -> list[NewFeedback]:
        return [
            _prepare(
                session,
                item,
                idempotency_key=batch_item_key(idempotency_key, index, item),
                settings=settings,
                validator=validator,
                prefix=f"items[{index}]",
                principal=principal,
            )
            for index, item in enumerate(items)
        ]

    if any(item.conversation_id is not None for item in items):
        return StoreUnit(prepare=prepare_all)
    return StoreUnit(prepared=prepare_all(None))
