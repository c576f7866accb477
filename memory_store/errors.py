"""Exceptions raised by memory_store; the service maps each one to an HTTP answer in one place.

Knows nothing about HTTP: `NotFound` is not a 404 here, just "no such row".
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every memory_store error."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached (connection refused, timeout, server restarting)."""


class DatabaseReadOnly(DatabaseUnavailable):
    """The database refuses writes (read-only file, folder or filesystem; a read-only server)."""


class DatabaseFileChanged(DatabaseUnavailable):
    """The SQLite file was deleted or replaced under the running service; nothing is written to it."""


class NotFound(StoreError):
    """The row asked for does not exist (or is not in the namespace asked for)."""

    def __init__(self, entity: str, key: object) -> None:
        super().__init__(f"{entity} {key!r} not found")
        self.entity = entity
        self.key = key


class Conflict(StoreError):
    """The change contradicts the stored state (duplicate version, illegal status transition...)."""


class IdempotencyConflict(Conflict):
    """An idempotency key was replayed with a different request body than the first time."""

    def __init__(self, namespace: str, key: str, existing_id: int) -> None:
        super().__init__(
            f"idempotency key {key!r} in namespace {namespace!r} was already used with a different "
            f"body (feedback {existing_id})"
        )
        self.namespace = namespace
        self.key = key
        self.existing_id = existing_id
