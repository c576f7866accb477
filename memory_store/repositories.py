"""Repositories: the small, keyword-only read/write API over the loraloop tables.

Convention: a repository wraps a Session it is given and never commits. It flushes so ids exist,
and the caller owns the transaction: `with session_factory.begin() as session:
FeedbackRepository(session).add(...)` commits once at the end, or rolls everything back on error
(so a batch is all-or-nothing). Every list is ordered by id ascending and paginated with an
`after_id` cursor (pass the last id of the previous page). Nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, exists, func, or_, select, union_all, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from memory_store.errors import Conflict, IdempotencyConflict, NotFound
from memory_store.filters import namespace_matches
from memory_store.models import (
    ADAPTER_VERSION_STATUSES,
    DEPLOYMENT_STATES,
    FEEDBACK_STATUSES,
    MEMORY_STATES,
    TRAINING_RUN_KINDS,
    TRAINING_RUN_STATUSES,
    Adapter,
    AdapterVersion,
    Conversation,
    Deployment,
    FeedbackItem,
    Memory,
    TrainingRun,
    utcnow,
)

DEFAULT_PAGE_SIZE = 100
# replay_sample reads every candidate id only when their id span is at most this wide
REPLAY_EXACT_SPAN = 4096
REPLAY_SEEKS_PER_STATEMENT = 200  # SQLite allows 500 terms in one compound SELECT


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return limit


def _page(stmt: Select[Any], id_column: Any, *, after_id: int | None, limit: int | None) -> Select[Any]:
    if after_id is not None:
        stmt = stmt.where(id_column > after_id)
    stmt = stmt.order_by(id_column)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        stmt = stmt.limit(limit)
    return stmt


# --- feedback -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewFeedback:
    """One feedback item to store, as validated by the caller (the shape of `POST /feedback`).

    `messages` may be None when `conversation_id` names a logged conversation: its messages are
    copied into the feedback row, so training never depends on the conversation staying around.
    """

    namespace: str
    continuation: str
    messages: list[dict[str, Any]] | None = None
    target_index: int | None = None
    reason: str | None = None
    memories: list[Any] | None = None
    tags: list[Any] | None = None
    conversation_id: int | None = None
    idempotency_key: str | None = None
    created_by: str | None = None  # audit label of the writer; not part of the request

    def request_hash(self) -> str:
        """sha256 of the canonical JSON of the body (not the key, not the writer's label)."""
        body = asdict(self)
        body.pop("idempotency_key")
        body.pop("created_by")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class FeedbackRepository:
    """Feedback items: idempotent ingestion, listing, and the training bookkeeping."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        namespace: str,
        continuation: str,
        messages: list[dict[str, Any]] | None = None,
        target_index: int | None = None,
        reason: str | None = None,
        memories: list[Any] | None = None,
        tags: list[Any] | None = None,
        conversation_id: int | None = None,
        idempotency_key: str | None = None,
        created_by: str | None = None,
    ) -> tuple[FeedbackItem, bool]:
        """Store one item; returns `(item, created)`.

        With an `idempotency_key`, a replay with the same body returns the stored row and
        `created=False` (also when two requests race: the unique constraint decides, the loser
        reads the winner's row); a replay with a different body raises `IdempotencyConflict`.
        Raises `NotFound` for an unknown `conversation_id` (or one in another namespace).
        """
        new = NewFeedback(
            namespace=namespace,
            continuation=continuation,
            messages=messages,
            target_index=target_index,
            reason=reason,
            memories=memories,
            tags=tags,
            conversation_id=conversation_id,
            idempotency_key=idempotency_key,
            created_by=created_by,
        )
        item, created = self._add_one(new)
        if created and idempotency_key is None:
            self.session.flush()
        return item, created

    def add_many(self, *, items: Sequence[NewFeedback]) -> list[tuple[FeedbackItem, bool]]:
        """Store several items in the caller's transaction; results in input order, as `add`.

        Bulk path: one lookup for every idempotency key of the batch, one flush for all new rows.
        When that flush loses a race (a concurrent request stored one of the keys meanwhile, or the
        batch repeats a key), it falls back to the item-by-item path, which settles each key."""
        stored = self._by_keys([(new.namespace, new.idempotency_key) for new in items if new.idempotency_key])
        results: list[tuple[FeedbackItem, bool] | None] = []
        fresh: list[FeedbackItem] = []
        for new in items:
            request_hash = new.request_hash()
            hit = stored.get((new.namespace, new.idempotency_key)) if new.idempotency_key else None
            if hit is not None:
                results.append((self._replayed(hit, request_hash), False))
                continue
            fresh.append(self._new_item(new, request_hash))
            results.append(None)
        if fresh:
            try:
                with self.session.begin_nested():
                    self.session.add_all(fresh)
                    self.session.flush()
            except IntegrityError:
                return [self._add_one(new) for new in items]
        created = iter(fresh)
        return [result if result is not None else (next(created), True) for result in results]

    def _add_one(self, new: NewFeedback) -> tuple[FeedbackItem, bool]:
        request_hash = new.request_hash()
        if new.idempotency_key is not None:
            existing = self._by_key(new.namespace, new.idempotency_key)
            if existing is not None:
                return self._replayed(existing, request_hash), False
        item = self._new_item(new, request_hash)
        if new.idempotency_key is None:
            self.session.add(item)
            return item, True
        try:
            with self.session.begin_nested():
                self.session.add(item)
        except IntegrityError:
            winner = self._by_key(new.namespace, new.idempotency_key)
            if winner is None:
                raise
            return self._replayed(winner, request_hash), False
        return item, True

    def _new_item(self, new: NewFeedback, request_hash: str) -> FeedbackItem:
        messages = new.messages
        if new.conversation_id is not None:
            conversation = ConversationRepository(self.session).get(
                id=new.conversation_id, namespace=new.namespace
            )
            if messages is None:
                messages = list(conversation.messages)
        if messages is None:
            raise ValueError("feedback needs messages or a conversation_id")
        return FeedbackItem(
            namespace=new.namespace,
            messages=messages,
            target_index=new.target_index,
            continuation=new.continuation,
            reason=new.reason,
            memories=new.memories,
            tags=new.tags,
            conversation_id=new.conversation_id,
            idempotency_key=new.idempotency_key,
            request_hash=request_hash,
            status="pending",
            created_at=utcnow(),
            created_by=new.created_by,
        )

    def _by_keys(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FeedbackItem]:
        """Stored items holding any of these (namespace, idempotency key) pairs."""
        found: dict[tuple[str, str], FeedbackItem] = {}
        by_namespace: dict[str, set[str]] = {}
        for namespace, key in keys:
            by_namespace.setdefault(namespace, set()).add(key)
        for namespace, namespace_keys in by_namespace.items():
            stmt = select(FeedbackItem).where(
                FeedbackItem.namespace == namespace, FeedbackItem.idempotency_key.in_(sorted(namespace_keys))
            )
            for item in self.session.scalars(stmt):
                assert item.idempotency_key is not None
                found[(namespace, item.idempotency_key)] = item
        return found

    def _by_key(self, namespace: str, key: str) -> FeedbackItem | None:
        stmt = select(FeedbackItem).where(
            FeedbackItem.namespace == namespace, FeedbackItem.idempotency_key == key
        )
        return self.session.scalars(stmt).first()

    @staticmethod
    def _replayed(existing: FeedbackItem, request_hash: str) -> FeedbackItem:
        if existing.request_hash != request_hash:
            assert existing.idempotency_key is not None
            raise IdempotencyConflict(existing.namespace, existing.idempotency_key, existing.id)
        return existing

    def get(self, *, id: int, namespace: str | None = None) -> FeedbackItem:
        item = self.session.get(FeedbackItem, id)
        if item is None or (namespace is not None and item.namespace != namespace):
            raise NotFound("feedback", id)
        return item

    def list(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        status: str | None = None,
        after_id: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        namespace_patterns: Sequence[str] | None = None,
    ) -> Sequence[FeedbackItem]:
        """Items created at or after `since`, oldest first; next page: `after_id=<last id>`.
        `namespace_patterns` (None: any) keeps the namespaces matching one of them."""
        stmt = select(FeedbackItem)
        if namespace is not None:
            stmt = stmt.where(FeedbackItem.namespace == namespace)
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(FeedbackItem.namespace, namespace_patterns))
        if since is not None:
            stmt = stmt.where(FeedbackItem.created_at >= since)
        if status is not None:
            _check_choice("status", status, FEEDBACK_STATUSES)
            stmt = stmt.where(FeedbackItem.status == status)
        return self.session.scalars(_page(stmt, FeedbackItem.id, after_id=after_id, limit=limit)).all()

    def pending_since(
        self, *, namespace: str, after_id: int = 0, limit: int | None = None
    ) -> Sequence[FeedbackItem]:
        """Pending items of `namespace` with id > `after_id`, oldest first (what the next run trains)."""
        stmt = select(FeedbackItem).where(
            FeedbackItem.namespace == namespace, FeedbackItem.status == "pending"
        )
        return self.session.scalars(_page(stmt, FeedbackItem.id, after_id=after_id, limit=limit)).all()

    def replay_sample(self, *, namespace: str, before_id: int, n: int, seed: int) -> Sequence[FeedbackItem]:
        """Up to `n` already-trained items with id < `before_id`, drawn deterministically from `seed`.

        Bounded whatever the history: when the candidates' ids span at most `REPLAY_EXACT_SPAN`
        (or 8n), they are read and sampled exactly; beyond, each draw is one index seek (the first
        candidate at or after a random id in the span, n seeks per statement, at most 4 rounds), so
        an item after a gap in the ids is a little more likely to be drawn. One row per draw is read."""
        if n <= 0:
            return []
        candidates = select(FeedbackItem.id).where(
            FeedbackItem.namespace == namespace,
            FeedbackItem.status == "trained",
            FeedbackItem.id < before_id,
        )
        low = self.session.scalar(candidates.order_by(FeedbackItem.id).limit(1))
        if low is None:
            return []
        high = int(self.session.scalar(candidates.order_by(FeedbackItem.id.desc()).limit(1)) or low)
        rng = random.Random(seed)
        if high - low + 1 <= max(REPLAY_EXACT_SPAN, 8 * n):
            ids = list(self.session.scalars(candidates.order_by(FeedbackItem.id)).all())
            chosen = sorted(rng.sample(ids, min(n, len(ids))))
        else:
            found: set[int] = set()
            for _ in range(4):  # rounds of draws, one statement each (a UNION ALL of index seeks)
                wanted = min(n - len(found), REPLAY_SEEKS_PER_STATEMENT)
                if wanted <= 0:
                    break
                seeks = [
                    candidates.where(FeedbackItem.id >= rng.randint(low, high))
                    .order_by(FeedbackItem.id)
                    .limit(1)
                    .subquery()
                    for _ in range(wanted)
                ]
                stmt = union_all(*(select(seek.c.id) for seek in seeks))
                found.update(int(hit) for hit in self.session.scalars(stmt))
            chosen = sorted(found)[:n]
        if not chosen:
            return []
        return self.session.scalars(
            select(FeedbackItem).where(FeedbackItem.id.in_(chosen)).order_by(FeedbackItem.id)
        ).all()

    def recent(self, *, namespace: str, status: str | None = None, limit: int) -> Sequence[FeedbackItem]:
        """The `limit` newest items of `namespace` (optionally in `status`), oldest first."""
        stmt = select(FeedbackItem).where(FeedbackItem.namespace == namespace)
        if status is not None:
            _check_choice("status", status, FEEDBACK_STATUSES)
            stmt = stmt.where(FeedbackItem.status == status)
        rows = self.session.scalars(stmt.order_by(FeedbackItem.id.desc()).limit(_positive(limit))).all()
        return rows[::-1]

    def mark_trained(self, *, ids: Iterable[int], version: int) -> int:
        """Mark items as trained into adapter `version`; returns how many rows changed."""
        return self._set_status(ids, status="trained", trained_in_version=version)

    def mark_skipped(self, *, ids: Iterable[int]) -> int:
        """Mark items that produce no training example (e.g. nothing left after truncation)."""
        return self._set_status(ids, status="skipped", trained_in_version=None)

    def _set_status(self, ids: Iterable[int], *, status: str, trained_in_version: int | None) -> int:
        id_list = sorted(set(ids))
        if not id_list:
            return 0
        result = self.session.execute(
            update(FeedbackItem)
            .where(FeedbackItem.id.in_(id_list))
            .values(status=status, trained_in_version=trained_in_version)
            .execution_options(synchronize_session="fetch")
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    def count_pending(self, *, namespace: str | None = None, at_most: int | None = None) -> int:
        """Pending items (of `namespace`); with `at_most`, min(count, at_most), which reads at most
        `at_most` index entries instead of every pending row."""
        rows = select(FeedbackItem.id).where(FeedbackItem.status == "pending")
        if namespace is not None:
            rows = rows.where(FeedbackItem.namespace == namespace)
        if at_most is not None:
            rows = rows.limit(max(at_most, 0))
        return int(self.session.scalar(select(func.count()).select_from(rows.subquery())) or 0)

    def pending_by_namespace(self, *, namespace_patterns: Sequence[str] | None = None) -> dict[str, int]:
        """{namespace: pending count} for every namespace (matching a pattern) with pending items."""
        stmt = select(FeedbackItem.namespace, func.count()).where(FeedbackItem.status == "pending")
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(FeedbackItem.namespace, namespace_patterns))
        rows = self.session.execute(stmt.group_by(FeedbackItem.namespace)).all()
        return {namespace: int(count) for namespace, count in rows}

    def status_counts(self, *, namespace: str | None = None) -> dict[str, int]:
        """{status: count} (for metrics); statuses with no item are reported as 0."""
        stmt = select(FeedbackItem.status, func.count()).group_by(FeedbackItem.status)
        if namespace is not None:
            stmt = stmt.where(FeedbackItem.namespace == namespace)
        counts = dict.fromkeys(FEEDBACK_STATUSES, 0)
        counts.update({status: int(count) for status, count in self.session.execute(stmt).all()})
        return counts


# --- conversations ----------------------------------------------------------------------------------


class ConversationRepository:
    """Logged conversations (feedback may reference them; distillation reads them)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        namespace: str,
        messages: list[dict[str, Any]],
        model: str | None = None,
        source: str | None = None,
        created_by: str | None = None,
    ) -> Conversation:
        conversation = Conversation(
            namespace=namespace,
            messages=messages,
            model=model,
            source=source,
            created_at=utcnow(),
            created_by=created_by,
        )
        self.session.add(conversation)
        self.session.flush()
        return conversation

    def get(self, *, id: int, namespace: str | None = None) -> Conversation:
        conversation = self.session.get(Conversation, id)
        if conversation is None or (namespace is not None and conversation.namespace != namespace):
            raise NotFound("conversation", id)
        return conversation

    def list(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        after_id: int | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
    ) -> Sequence[Conversation]:
        stmt = select(Conversation)
        if namespace is not None:
            stmt = stmt.where(Conversation.namespace == namespace)
        if since is not None:
            stmt = stmt.where(Conversation.created_at >= since)
        return self.session.scalars(_page(stmt, Conversation.id, after_id=after_id, limit=limit)).all()

    def recent(self, *, namespace: str, limit: int) -> Sequence[Conversation]:
        """The `limit` most recent conversations of `namespace`, oldest first (one index range)."""
        rows = self.session.scalars(
            select(Conversation)
            .where(Conversation.namespace == namespace)
            .order_by(Conversation.id.desc())
            .limit(_positive(limit))
        ).all()
        return rows[::-1]

    def namespaces(self) -> list[str]:
        """Every namespace with at least one logged conversation."""
        stmt = select(Conversation.namespace).distinct().order_by(Conversation.namespace)
        return list(self.session.scalars(stmt))

    def _prunable(
        self, namespace: str, before: datetime | None, keep_newest: int | None
    ) -> Select[Any] | None:
        conditions: list[Any] = []
        if before is not None:
            conditions.append(Conversation.created_at < before)
        if keep_newest is not None:
            # the id of the newest conversation beyond the `keep_newest` most recent ones
            threshold = self.session.scalar(
                select(Conversation.id)
                .where(Conversation.namespace == namespace)
                .order_by(Conversation.id.desc())
                .offset(keep_newest)
                .limit(1)
            )
            if threshold is not None:
                conditions.append(Conversation.id <= threshold)
        if not conditions:
            return None
        return select(Conversation.id).where(
            Conversation.namespace == namespace, or_(*conditions), ~_referenced_by_feedback()
        )

    def prunable_ids(
        self, *, namespace: str, before: datetime | None = None, keep_newest: int | None = None, limit: int
    ) -> list[int]:
        """Ids (oldest first, at most `limit`) of `namespace`'s conversations created before `before`
        or beyond its `keep_newest` most recent ones, that no feedback item points at."""
        stmt = self._prunable(namespace, before, keep_newest)
        if stmt is None:
            return []
        return [int(i) for i in self.session.scalars(stmt.order_by(Conversation.id).limit(_positive(limit)))]

    def count_prunable(
        self, *, namespace: str, before: datetime | None = None, keep_newest: int | None = None
    ) -> int:
        """How many conversations `prunable_ids` would return without a limit."""
        stmt = self._prunable(namespace, before, keep_newest)
        if stmt is None:
            return 0
        return int(self.session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)

    def delete_unreferenced(self, *, ids: Iterable[int]) -> int:
        """Delete these conversations, except any a feedback item points at (checked in the same
        statement, so a reference added meanwhile keeps its conversation). Returns how many went."""
        id_list = sorted(set(ids))
        if not id_list:
            return 0
        result = self.session.execute(
            delete(Conversation)
            .where(Conversation.id.in_(id_list), ~_referenced_by_feedback())
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def _referenced_by_feedback() -> Any:
    return exists().where(FeedbackItem.conversation_id == Conversation.id)


# --- memories ----------------------------------------------------------------------------------------


class MemoryRepository:
    """Namespaced memories; delete is soft (state `retired`), distillation marks them `baked`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        namespace: str,
        content: str,
        title: str | None = None,
        priority: int = 0,
        tags: list[Any] | None = None,
        created_by: str | None = None,
    ) -> Memory:
        now = utcnow()
        memory = Memory(
            namespace=namespace,
            content=content,
            title=title,
            priority=priority,
            tags=tags,
            state="active",
            created_at=now,
            updated_at=now,
            created_by=created_by,
        )
        self.session.add(memory)
        self.session.flush()
        return memory

    def get(self, *, id: int, namespace: str | None = None) -> Memory:
        memory = self.session.get(Memory, id)
        if memory is None or (namespace is not None and memory.namespace != namespace):
            raise NotFound("memory", id)
        return memory

    def list(
        self,
        *,
        namespace: str,
        state: str | None = "active",
        after_id: int | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
    ) -> Sequence[Memory]:
        """Memories of `namespace` in `state` (None: every state), by id."""
        stmt = select(Memory).where(Memory.namespace == namespace)
        if state is not None:
            _check_choice("state", state, MEMORY_STATES)
            stmt = stmt.where(Memory.state == state)
        return self.session.scalars(_page(stmt, Memory.id, after_id=after_id, limit=limit)).all()

    def delete(self, *, id: int, namespace: str | None = None, retired_by: str | None = None) -> Memory:
        """Retire a memory (kept for history; no longer listed as active). Idempotent."""
        memory = self.get(id=id, namespace=namespace)
        if memory.state != "retired":
            memory.state = "retired"
            memory.retired_by = retired_by
            memory.updated_at = utcnow()
            self.session.flush()
        return memory

    def mark_baked(self, *, ids: Iterable[int], version: int) -> int:
        """Mark active memories as baked into adapter `version`; returns how many changed."""
        id_list = sorted(set(ids))
        if not id_list:
            return 0
        result = self.session.execute(
            update(Memory)
            .where(Memory.id.in_(id_list), Memory.state == "active")
            .values(state="baked", baked_in_version=version, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


# --- adapters ----------------------------------------------------------------------------------------

# statuses from which a version may become current (it must also have files: `path` set)
SERVABLE_STATUSES = ("candidate", "current", "retired")
# statuses whose files retention may delete (never a candidate: it may be promoting right now)
DELETABLE_STATUSES = ("retired", "rejected", "failed")


def files_deleted_message(row: AdapterVersion) -> str:
    assert row.files_deleted_at is not None
    return (
        f"version {row.version} of {row.adapter_name!r} is a tombstone: its weights were deleted by "
        f"retention at {row.files_deleted_at.isoformat(timespec='seconds')} (pin versions to keep them)"
    )


class AdapterRepository:
    """Adapters (one per namespace), their immutable versions and the current-version pointer.

    Version numbers start at 0 (v0 is the zero adapter that stands for the base model). They are
    allocated under a lock on the adapter row (`SELECT ... FOR UPDATE` on PostgreSQL, the write
    lock on SQLite) and backed by unique(adapter_name, version).
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def ensure_adapter(self, *, name: str, base_model: str | None = None) -> Adapter:
        """The adapter `name`, created when missing (safe when two callers race)."""
        adapter = self.session.get(Adapter, name)
        if adapter is not None:
            if adapter.base_model is None and base_model is not None:
                adapter.base_model = base_model
            return adapter
        try:
            with self.session.begin_nested():
                adapter = Adapter(name=name, base_model=base_model, created_at=utcnow())
                self.session.add(adapter)
        except IntegrityError:
            adapter = self.session.get(Adapter, name, populate_existing=True)
            if adapter is None:
                raise
        return adapter

    def get_adapter(self, *, name: str) -> Adapter:
        adapter = self.session.get(Adapter, name)
        if adapter is None:
            raise NotFound("adapter", name)
        return adapter

    def _lock_adapter(self, name: str) -> Adapter:
        adapter = self.session.scalars(
            select(Adapter)
            .where(Adapter.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if adapter is None:
            raise NotFound("adapter", name)
        return adapter

    def next_version(self, *, name: str) -> int:
        """The next free version number of `name` (locks the adapter row until the caller commits)."""
        self._lock_adapter(name)
        latest = self.session.scalar(
            select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_name == name)
        )
        return 0 if latest is None else int(latest) + 1

    def add_version(
        self,
        *,
        name: str,
        version: int | None = None,
        status: str = "candidate",
        parent_version: int | None = None,
        training_run_id: int | None = None,
        path: str | None = None,
        sha256: str | None = None,
        metrics: dict[str, Any] | None = None,
        reason: str | None = None,
        feedback_from_id: int | None = None,
        feedback_to_id: int | None = None,
    ) -> AdapterVersion:
        """Record a version (`version=None` allocates the next number). Use `set_current` to serve it.

        Raises `Conflict` when the version number is taken, `NotFound` when the adapter is missing.
        """
        _check_choice("status", status, ADAPTER_VERSION_STATUSES)
        if status == "current":
            raise ValueError("add the version first, then make it current with set_current")
        if version is None:
            version = self.next_version(name=name)
        else:
            self._lock_adapter(name)
        row = AdapterVersion(
            adapter_name=name,
            version=version,
            status=status,
            parent_version=parent_version,
            training_run_id=training_run_id,
            path=path,
            sha256=sha256,
            metrics=metrics,
            reason=reason,
            feedback_from_id=feedback_from_id,
            feedback_to_id=feedback_to_id,
            created_at=utcnow(),
        )
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError as error:
            raise Conflict(f"adapter {name!r} already has version {version}") from error
        return row

    def set_status(
        self, *, name: str, version: int, status: str, reason: str | None = None
    ) -> AdapterVersion:
        """Mark a non-current version candidate/rejected/retired/failed (current: use set_current)."""
        _check_choice("status", status, ADAPTER_VERSION_STATUSES)
        if status == "current":
            raise ValueError("use set_current to make a version current")
        adapter = self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if adapter.current_version == version:
            raise Conflict(
                f"version {version} of {name!r} is current; roll back or set another current first"
            )
        if status == "retired" and row.status != "retired":
            row.retired_at = utcnow()
        row.status = status
        if reason is not None:
            row.reason = reason
        self.session.flush()
        return row

    def set_current(self, *, name: str, version: int) -> AdapterVersion:
        """Flip the current pointer to `version` (the previous current becomes `retired`).

        Atomic: the adapter row is locked and both rows change in the caller's transaction. The
        version must have files (`path`) and be a candidate or retired one, else `Conflict`.
        """
        adapter = self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if adapter.current_version == version:
            return row
        if row.files_deleted_at is not None:
            raise Conflict(files_deleted_message(row))
        if row.status not in SERVABLE_STATUSES or row.path is None:
            raise Conflict(
                f"version {version} of {name!r} cannot become current "
                f"(status {row.status!r}, path {'set' if row.path else 'missing'})"
            )
        if adapter.current_version is not None:
            previous = self.session.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.adapter_name == name, AdapterVersion.version == adapter.current_version
                )
            ).first()
            if previous is not None:
                previous.status = "retired"
                previous.retired_at = utcnow()
        row.status = "current"
        adapter.current_version = version
        self.session.flush()
        return row

    def current(self, *, name: str) -> AdapterVersion | None:
        adapter = self.session.get(Adapter, name)
        if adapter is None:
            raise NotFound("adapter", name)
        if adapter.current_version is None:
            return None
        return self.get_version(name=name, version=adapter.current_version)

    def get_version(self, *, name: str, version: int) -> AdapterVersion:
        row = self.session.scalars(
            select(AdapterVersion).where(
                AdapterVersion.adapter_name == name, AdapterVersion.version == version
            )
        ).first()
        if row is None:
            raise NotFound("adapter version", f"{name}/v{version}")
        return row

    def has_version(self, *, name: str, version: int) -> bool:
        return (
            self.session.scalar(
                select(AdapterVersion.id).where(
                    AdapterVersion.adapter_name == name, AdapterVersion.version == version
                )
            )
            is not None
        )

    def list_versions(
        self,
        *,
        name: str,
        after_version: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> Sequence[AdapterVersion]:
        """Versions of `name` by version number (`newest_first`: descending); the next page starts
        after `after_version` in that order. One range of the (adapter_name, version) index."""
        self.get_adapter(name=name)
        stmt = select(AdapterVersion).where(AdapterVersion.adapter_name == name)
        if after_version is not None:
            column = AdapterVersion.version
            stmt = stmt.where(column < after_version if newest_first else column > after_version)
        stmt = stmt.order_by(AdapterVersion.version.desc() if newest_first else AdapterVersion.version)
        if limit is not None:
            stmt = stmt.limit(_positive(limit))
        return self.session.scalars(stmt).all()

    def count_versions(self, *, name: str) -> int:
        return int(
            self.session.scalar(
                select(func.count()).select_from(AdapterVersion).where(AdapterVersion.adapter_name == name)
            )
            or 0
        )

    def list_adapters(
        self,
        *,
        after_name: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        namespace_patterns: Sequence[str] | None = None,
    ) -> Sequence[Adapter]:
        """Adapters by name (without their versions); next page: `after_name=<last name>`."""
        stmt = select(Adapter)
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(Adapter.name, namespace_patterns))
        if after_name is not None:
            stmt = stmt.where(Adapter.name > after_name)
        return self.session.scalars(stmt.order_by(Adapter.name).limit(_positive(limit))).all()

    def list_with_versions(self, *, namespace_patterns: Sequence[str] | None = None) -> Sequence[Adapter]:
        """Every adapter by name (of the matching namespaces), with `.versions` loaded (by version)."""
        stmt = select(Adapter).options(selectinload(Adapter.versions)).order_by(Adapter.name)
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(Adapter.name, namespace_patterns))
        return self.session.scalars(stmt).all()

    def set_pinned(self, *, name: str, version: int, pinned: bool) -> AdapterVersion:
        """Pin a version (retention never deletes its files) or unpin it. A version whose files are
        already deleted cannot be pinned (`Conflict`)."""
        self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if pinned and row.files_deleted_at is not None:
            raise Conflict(files_deleted_message(row))
        row.pinned = pinned
        self.session.flush()
        return row

    def mark_files_deleted(self, *, name: str, version: int) -> AdapterVersion:
        """Turn a version into a tombstone before its folder is deleted: `path` cleared,
        `files_deleted_at` set; row, metrics and lineage stay. Holds the adapter row lock, and
        refuses (`Conflict`) the current version, a pinned one, and one not retired/rejected/failed."""
        adapter = self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if adapter.current_version == version or row.pinned or row.status not in DELETABLE_STATUSES:
            raise Conflict(
                f"version {version} of {name!r} must keep its files "
                f"({'current' if adapter.current_version == version else row.status}"
                f"{', pinned' if row.pinned else ''})"
            )
        if row.files_deleted_at is None:
            row.files_deleted_at = utcnow()
        row.path = None
        self.session.flush()
        return row

    def rollback(self, *, name: str, to: int | None = None, reason: str | None = None) -> AdapterVersion:
        """Make an earlier version current again; `to=None` picks the newest retired one before it.

        The version rolled back from becomes `retired` (with `reason` recorded on it when given).
        """
        adapter = self._lock_adapter(name)
        current = adapter.current_version
        if to is None:
            stmt = select(AdapterVersion).where(
                AdapterVersion.adapter_name == name,
                AdapterVersion.status == "retired",
                AdapterVersion.path.is_not(None),
            )
            if current is not None:
                stmt = stmt.where(AdapterVersion.version < current)
            target = self.session.scalars(stmt.order_by(AdapterVersion.version.desc()).limit(1)).first()
            if target is None:
                raise Conflict(f"adapter {name!r} has no earlier version to roll back to")
            to = target.version
        row = self.set_current(name=name, version=to)
        if current is not None and current != to and reason is not None:
            self.get_version(name=name, version=current).reason = reason
            self.session.flush()
        return row


# --- training runs -----------------------------------------------------------------------------------


class TrainingRunRepository:
    """One row per training/distillation attempt, with its data range, metrics and outcome."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def start(
        self,
        *,
        namespace: str,
        kind: str,
        job_id: int | None = None,
        parent_version: int | None = None,
        feedback_from_id: int | None = None,
        feedback_to_id: int | None = None,
    ) -> TrainingRun:
        _check_choice("kind", kind, TRAINING_RUN_KINDS)
        run = TrainingRun(
            namespace=namespace,
            kind=kind,
            status="running",
            job_id=job_id,
            parent_version=parent_version,
            feedback_from_id=feedback_from_id,
            feedback_to_id=feedback_to_id,
            started_at=utcnow(),
        )
        self.session.add(run)
        self.session.flush()
        return run

    def finish(
        self,
        *,
        id: int,
        status: str,
        version: int | None = None,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> TrainingRun:
        """Record the outcome: succeeded (with `version`), rejected (by the gate), failed, cancelled."""
        _check_choice("status", status, TRAINING_RUN_STATUSES)
        if status == "running":
            raise ValueError("finish needs a final status")
        run = self.get(id=id)
        run.status = status
        run.version = version if version is not None else run.version
        if metrics is not None:
            run.metrics = {**(run.metrics or {}), **metrics}
        run.error = error
        run.finished_at = utcnow()
        self.session.flush()
        return run

    def get(self, *, id: int) -> TrainingRun:
        run = self.session.get(TrainingRun, id)
        if run is None:
            raise NotFound("training run", id)
        return run

    def list(
        self,
        *,
        namespace: str | None = None,
        kind: str | None = None,
        after_id: int | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
    ) -> Sequence[TrainingRun]:
        stmt = select(TrainingRun)
        if namespace is not None:
            stmt = stmt.where(TrainingRun.namespace == namespace)
        if kind is not None:
            stmt = stmt.where(TrainingRun.kind == kind)
        return self.session.scalars(_page(stmt, TrainingRun.id, after_id=after_id, limit=limit)).all()

    def latest(
        self, *, namespace: str, kind: str | None = None, status: str | None = None
    ) -> TrainingRun | None:
        stmt = select(TrainingRun).where(TrainingRun.namespace == namespace)
        if kind is not None:
            stmt = stmt.where(TrainingRun.kind == kind)
        if status is not None:
            stmt = stmt.where(TrainingRun.status == status)
        return self.session.scalars(stmt.order_by(TrainingRun.id.desc()).limit(1)).first()


# --- deployments -------------------------------------------------------------------------------------


class DeploymentRepository:
    """What each vLLM replica serves, one row per (replica_url, served_name)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def upsert(
        self,
        *,
        adapter_name: str,
        version: int,
        replica_url: str,
        served_name: str,
        state: str,
        error: str | None = None,
    ) -> Deployment:
        """Create or update the row of (replica_url, served_name)."""
        _check_choice("state", state, DEPLOYMENT_STATES)
        row = self._find(replica_url, served_name)
        if row is None:
            try:
                with self.session.begin_nested():
                    row = Deployment(
                        adapter_name=adapter_name,
                        version=version,
                        replica_url=replica_url,
                        served_name=served_name,
                        state=state,
                        error=error,
                        updated_at=utcnow(),
                    )
                    self.session.add(row)
                return row
            except IntegrityError:
                row = self._find(replica_url, served_name)
                if row is None:
                    raise
        row.adapter_name = adapter_name
        row.version = version
        row.state = state
        row.error = error
        row.updated_at = utcnow()
        self.session.flush()
        return row

    def _find(self, replica_url: str, served_name: str) -> Deployment | None:
        return self.session.scalars(
            select(Deployment).where(
                Deployment.replica_url == replica_url, Deployment.served_name == served_name
            )
        ).first()

    def get(self, *, id: int) -> Deployment:
        row = self.session.get(Deployment, id)
        if row is None:
            raise NotFound("deployment", id)
        return row

    def list(
        self,
        *,
        adapter_name: str | None = None,
        replica_url: str | None = None,
        state: str | None = None,
    ) -> Sequence[Deployment]:
        stmt = select(Deployment)
        if adapter_name is not None:
            stmt = stmt.where(Deployment.adapter_name == adapter_name)
        if replica_url is not None:
            stmt = stmt.where(Deployment.replica_url == replica_url)
        if state is not None:
            stmt = stmt.where(Deployment.state == state)
        return self.session.scalars(stmt.order_by(Deployment.id)).all()

    def delete(self, *, id: int) -> None:
        self.session.delete(self.get(id=id))
        self.session.flush()
