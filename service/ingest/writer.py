"""Group commit for feedback ingestion: one writer thread stores the items of every request.

`FeedbackWriter.submit(unit)` hands a request's `StoreUnit` to the writer thread and blocks until
it is committed. The thread takes every unit waiting (at most `max_group`); when the previous
group held several units (requests are concurrent), it first waits `linger_s` (1 ms) for more, as
PostgreSQL's `commit_delay` does: a group's fixed cost, about 1.5 ms of CPU, is then paid once for
more requests (a lone client is not delayed). It stores them in ONE transaction: the items of all
units with one `FeedbackRepository.add_many` (one multi-row insert; the idempotency keys are
looked up only when it conflicts) in a savepoint; when that fails (an idempotency conflict, a key
repeated in the group), each unit again in its own savepoint, which settles each as a transaction
of its own would. It then enqueues training once per namespace that got new items, commits,
checks that the SQLite file is still the pinned one, and only then answers the units. So:

* every answer follows the commit that holds its items (a 202 is durable, as with a per-request
  transaction);
* on SQLite no two feedback writers of this process contend for the write lock, so none sleeps in
  the busy handler, and N requests in flight cost one transaction and one commit;
* a unit's own error (validation, idempotency conflict) rolls back its savepoint only and is raised
  in its own request; an error of the transaction (enqueue, commit, file check, a connection lost
  while storing) is raised in every request of the group, none of which was then stored; a lost
  connection or database is `DatabaseUnavailable` (503) for all of them.

`DirectFeedbackWriter` is the plain alternative (`LORALOOP_FEEDBACK_GROUP_COMMIT=false`): each unit
in its own transaction in the caller's thread, as before group commit. Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import anyio
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import check_database_file
from memory_store.errors import DatabaseUnavailable
from memory_store.repositories import NewFeedback
from service.config import Settings
from service.ingest.intake import AcceptedItem, StoreUnit, enqueue_training

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    unit: StoreUnit
    items: list[NewFeedback] = field(default_factory=list)
    future: Future[list[AcceptedItem]] = field(default_factory=Future)


class DirectFeedbackWriter:
    """One transaction per unit, in the caller's thread: store, enqueue training, commit, check
    the SQLite file, return. Concurrent units contend for SQLite's write lock (busy handler)."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self._session_factory = session_factory
        self._settings = settings

    async def submit_async(self, unit: StoreUnit) -> list[AcceptedItem]:
        """`submit` from the event loop (in a worker thread: it blocks on SQLite's lock)."""
        return await anyio.to_thread.run_sync(self.submit, unit)

    def submit(self, unit: StoreUnit) -> list[AcceptedItem]:
        with self._session_factory() as session:
            try:
                accepted = unit.store(session, unit.items(session))
                namespaces = {entry.item.namespace for entry in accepted if entry.created}
                if namespaces:
                    enqueue_training(session, namespaces, self._settings)
                session.commit()
                check_database_file(session.get_bind())
            except BaseException:
                session.rollback()
                raise
        return accepted

    def close(self) -> None:
        """Nothing to stop."""


class FeedbackWriter:
    """The process's one feedback writer (see the module docstring). The thread starts on the
    first `submit` and runs until `close()`; a later `submit` starts it again."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        settings: Settings,
        *,
        max_group: int = 256,
        linger_s: float = 0.001,
    ) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._max_group = max_group
        self._linger_s = linger_s
        self._last_group = 1
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, unit: StoreUnit) -> list[AcceptedItem]:
        """Run `unit` in the next group; returns once its items are committed (or raises its error)."""
        pending = _Pending(unit)
        self._ensure_started()
        self._queue.put(pending)
        return pending.future.result()

    async def submit_async(self, unit: StoreUnit) -> list[AcceptedItem]:
        """`submit` from the event loop: awaits the commit without holding a thread."""
        pending = _Pending(unit)
        self._ensure_started()
        self._queue.put(pending)
        return await asyncio.wrap_future(pending.future)

    def close(self) -> None:
        """Stop the thread once the units already submitted are answered."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            deadline = time.monotonic() + (self._linger_s if self._last_group > 1 else 0.0)
            while len(group) < self._max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:  # concurrent requests: the next one is likely a moment away
                        more = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if more is None:
                    stop = True
                    break
                group.append(more)
            self._last_group = len(group)
            self._write(group)
            if stop:
                return

    def _write(self, group: list[_Pending]) -> None:
        # a unit whose request was cancelled while it waited is not stored (nobody is answered);
        # the others can no longer be cancelled, so answering them below cannot fail
        group = [pending for pending in group if pending.future.set_running_or_notify_cancel()]
        if not group:
            return
        done: list[tuple[_Pending, list[AcceptedItem]]] = []  # the units that stored (or replayed)
        try:
            with self._session_factory() as session:
                try:
                    done = self._store(session, group)
                    namespaces = {
                        entry.item.namespace for _, accepted in done for entry in accepted if entry.created
                    }
                    if namespaces:
                        enqueue_training(session, namespaces, self._settings)
                    session.commit()
                    check_database_file(session.get_bind())  # the commit is in the file a restart will open
                except BaseException:
                    session.rollback()
                    raise
        except BaseException as error:  # noqa: BLE001 - nothing of the group is stored: every request says so
            if not isinstance(error, Exception):
                error = RuntimeError(f"feedback writer interrupted: {error!r}")
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        for pending, accepted in done:
            pending.future.set_result(accepted)

    @staticmethod
    def _store(session: Session, group: list[_Pending]) -> list[tuple[_Pending, list[AcceptedItem]]]:
        """Store the group's units; a unit's own error goes to its future (the others proceed).
        An error of the database itself (unreachable, connection dropped, transaction no longer
        usable) is the transaction's: it is raised, and every request of the group gets it."""
        ready: list[_Pending] = []
        for pending in group:
            try:
                pending.items = pending.unit.items(session)  # reads only (a conversation's messages)
                ready.append(pending)
            except Exception as error:  # noqa: BLE001 - the unit's own error, for its request
                _raise_if_transaction_error(session, error)
                pending.future.set_exception(error)
        try:
            with session.begin_nested():
                stored = StoreUnit.store(session, [item for pending in ready for item in pending.items])
        except Exception as error:  # noqa: BLE001 - settled unit by unit below
            _raise_if_transaction_error(session, error)
            stored = None
        if stored is not None:
            done, offset = [], 0
            for pending in ready:
                done.append((pending, stored[offset : offset + len(pending.items)]))
                offset += len(pending.items)
            return done
        done = []
        for pending in ready:
            try:
                with session.begin_nested():
                    done.append((pending, StoreUnit.store(session, pending.items)))
            except Exception as error:  # noqa: BLE001 - the unit's own error, for its request
                _raise_if_transaction_error(session, error)
                pending.future.set_exception(error)
        return done


def _raise_if_transaction_error(session: Session, error: Exception) -> None:
    """Raise `DatabaseUnavailable` when `error` is not one unit's but the whole transaction's: the
    database is unavailable (unreachable, read-only, file replaced), the connection dropped, or the
    session's transaction can no longer be used (rolled back under us after a disconnect). Every
    request of the group then gets a 503, never another unit's 500."""
    if isinstance(error, DatabaseUnavailable):
        raise error
    lost = isinstance(error, (sa_exc.PendingRollbackError, sa_exc.ResourceClosedError)) or (
        isinstance(error, sa_exc.DBAPIError)
        and (error.connection_invalidated or isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)))
    )
    if lost or not session.is_active:
        raise DatabaseUnavailable(f"the transaction was lost: {type(error).__name__}") from error
