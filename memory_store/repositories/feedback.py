"""Feedback items: the training data (stored, deduplicated, queued, replayed, never deleted silently)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, union_all, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from memory_store.errors import IdempotencyConflict, NotFound
from memory_store.filters import namespace_matches
from memory_store.models import (
    FEEDBACK_STATUSES,
    FeedbackItem,
    utcnow,
)
from memory_store.repositories._common import DEFAULT_PAGE_SIZE, _check_choice, _page, _positive
from memory_store.repositories.conversations import ConversationRepository

# replay_sample reads every candidate id only when their id span is at most this wide
REPLAY_EXACT_SPAN = 4096
REPLAY_SEEKS_PER_STATEMENT = 200  # SQLite allows 500 terms in one compound SELECT


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
        body = {  # the fields of asdict(self) but the two above, without its deep copy
            "namespace": self.namespace,
            "continuation": self.continuation,
            "messages": self.messages,
            "target_index": self.target_index,
            "reason": self.reason,
            "memories": self.memories,
            "tags": self.tags,
            "conversation_id": self.conversation_id,
        }
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

        Fast path, for items that are all new (the usual case): one INSERT of every row and no
        lookup; the unique (namespace, idempotency_key) constraint catches a replay. When it does
        (a replayed key, a key the batch repeats, or one a concurrent request stored meanwhile),
        the INSERT is undone and the keys are looked up: replays are answered, the rest inserted.
        When that loses a race too, each item is settled on its own."""
        if not items:
            return []
        hashes = [new.request_hash() for new in items]
        fresh = [self._new_item(new, request_hash) for new, request_hash in zip(items, hashes, strict=True)]
        try:
            with self.session.begin_nested():
                self._insert(fresh)
        except IntegrityError:
            return self._add_looked_up(items, hashes)
        return [(item, True) for item in fresh]

    def _add_looked_up(
        self, items: Sequence[NewFeedback], hashes: Sequence[str]
    ) -> list[tuple[FeedbackItem, bool]]:
        """`add_many` with one lookup of every idempotency key first."""
        stored = self._by_keys([(new.namespace, new.idempotency_key) for new in items if new.idempotency_key])
        results: list[tuple[FeedbackItem, bool] | None] = []
        fresh: list[FeedbackItem] = []
        for new, request_hash in zip(items, hashes, strict=True):
            hit = stored.get((new.namespace, new.idempotency_key)) if new.idempotency_key else None
            if hit is not None:
                results.append((self._replayed(hit, request_hash), False))
                continue
            fresh.append(self._new_item(new, request_hash))
            results.append(None)
        if fresh:
            try:
                with self.session.begin_nested():
                    self._insert(fresh)
            except IntegrityError:
                return [self._add_one(new) for new in items]
        created = iter(fresh)
        return [result if result is not None else (next(created), True) for result in results]

    def _insert(self, fresh: Sequence[FeedbackItem]) -> None:
        """INSERT the rows of `fresh` in one statement (one multi-row VALUES per chunk) and mark
        them persistent with their ids, without the unit of work's per-object bookkeeping."""
        table = FeedbackItem.__table__
        columns = [column.key for column in table.columns if column.key != "id"]
        rows = [{key: getattr(item, key) for key in columns} for item in fresh]
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        ids = self.session.connection().execute(statement, rows).scalars().all()
        for item, item_id in zip(fresh, ids, strict=True):
            item.id = item_id
            make_transient_to_detached(item)  # as if loaded: added below as persistent, not INSERTed again
            self.session.add(item)

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
            trained_in_version=None,
            created_at=utcnow(),
            created_by=new.created_by,
        )

    def _by_keys(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], FeedbackItem]:
        """Stored items holding any of these (namespace, idempotency key) pairs."""
        found: dict[tuple[str, str], FeedbackItem] = {}
        by_namespace: dict[str, set[str]] = {}
        for namespace, key in keys:
            by_namespace.setdefault(namespace, set()).add(key)
        table = FeedbackItem.__table__
        hits: list[int] = []
        for namespace, namespace_keys in by_namespace.items():
            # ids first, on the connection (nearly always none): only hits are loaded as objects
            stmt = select(table.c.id).where(
                table.c.namespace == namespace, table.c.idempotency_key.in_(sorted(namespace_keys))
            )
            hits.extend(self.session.connection().execute(stmt).scalars())
        if hits:
            for item in self.session.scalars(select(FeedbackItem).where(FeedbackItem.id.in_(hits))):
                assert item.idempotency_key is not None
                found[(item.namespace, item.idempotency_key)] = item
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
